"""edge-agent: run LLM prompts across a fleet of edge devices over MQTT."""

__version__ = "0.1.0"
