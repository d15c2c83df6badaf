"""A tiny llama-architecture model in GGUF, random weights, written here: never downloaded.

``write_tiny_gguf(path)`` writes the same bytes every time (a fixed seed, no timestamps),
about 0.5 MB: 2 layers, 64-wide, a SentencePiece-style vocabulary (``<unk>``, ``<s>``,
``</s>``, the 256 byte tokens, a few dozen word pieces) and a one-line chat template. It
loads in milliseconds and generates thousands of tokens a second on a CPU; what it says is
noise, which is all an executor test needs.

Two behaviours are built into the weights, so tests know what the engine will do:
- ``</s>`` (end of sequence) is ruled out after any token but one: a prompt that ends with
  the word ``bye`` (STOP_WORD) makes ``</s>`` the very next token, so the engine stops
  with finish reason "stop" and an empty answer. The model never says ``bye`` itself, so
  any other prompt runs to ``max_tokens`` (finish reason "length").
- Dimension 1 of every embedding is a constant and dimension 0 is zero but for STOP_WORD's
  embedding: the logit of ``</s>`` reads only those two (see ``_EOS_ROW``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEED = 18
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
CONTEXT = 4096
STOP_WORD = "bye"
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}"
                 "{% if not loop.last %}\n{% endif %}{% endfor %}")

_WORDS = ("the", "a", "and", "to", "of", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at",
          "by", "hello", "world", "fox", "quick", "brown", "jumps", "over", "lazy", "dog", "say", "it",
          "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "yes", "no",
          "tell", "me", "story", "about", "edge", "device", "model", STOP_WORD)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) in SentencePiece's layout: 0 <unk>, 1 <s>, 2 </s>,
    then <0x00>…<0xFF>, then word pieces (each with and without the ▁ word start)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    pieces: list[str] = []
    for word in dict.fromkeys(_WORDS):
        pieces += ["\u2581" + word, word]
    pieces += ["\u2581", ".", ",", "\n"]
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        scores.append(-1.0 - i * 0.01)  # earlier pieces are preferred by the tokenizer
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: str | Path) -> Path:
    """Write the model to ``path`` (same bytes every call) and return the path."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(SEED)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edge-agent tiny test model")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def normal(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = normal(n_vocab, N_EMBD, scale=1.0)
    embd[:, 0] = 0.0
    embd[:, 1] = 3.0
    embd[tokens.index("\u2581" + STOP_WORD), 0] = 30.0
    w.add_tensor("token_embd.weight", embd)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", normal(N_EMBD, N_EMBD, scale=0.02))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", normal(N_FF, N_EMBD, scale=0.02))
        w.add_tensor(f"blk.{i}.ffn_up.weight", normal(N_FF, N_EMBD, scale=0.02))
        w.add_tensor(f"blk.{i}.ffn_down.weight", normal(N_EMBD, N_FF, scale=0.02))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    out = normal(n_vocab, N_EMBD, scale=1.0)
    out[:, :2] = 0.0            # no token but </s> reads the two marker dimensions
    out[3:259] *= 0.2           # byte tokens are rarely chosen: answers are mostly word pieces
    out[2] = _EOS_ROW
    for piece in ("\u2581" + STOP_WORD, STOP_WORD):  # the model never says STOP_WORD itself
        out[tokens.index(piece), 1] = -10.0
    w.add_tensor("output.weight", out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# </s>'s logit: +10 per unit of the STOP_WORD marker, -10 per unit of the constant one.
# After the final RMS norm, an ordinary token gives about -28 (never chosen) and STOP_WORD
# about +70 (always chosen), against about ±25 for the other tokens.
_EOS_ROW = np.zeros(N_EMBD, dtype=np.float32)
_EOS_ROW[0], _EOS_ROW[1] = 10.0, -10.0
