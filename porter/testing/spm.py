"""A stock-style SentencePiece GGUF, as llama.cpp's converter writes one (its
``_create_vocab_sentencepiece``): a sentencepiece BPE model trained here with Llama's options (byte
fallback, identity normalization, whitespace kept) and a tiny llama whose porter.* and tokenizer.*
keys are replaced by that model's vocabulary. Used by tests/runtime/test_spm_vocab.py and
bench/spm_vocab.py (which compares llama.cpp's tokenization of the same file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# A little text beyond the Python reference so that some multi-byte characters are pieces of
# their own and others fall back to bytes.
EXTRA = "naïve café über Straße déjà vu, 日本語のテキスト, 中文文本, emoji 🙂🙂 ñandú\n"
SPECIAL_TEXTS = ("<s>", "</s>", "<unk>")  # porter's encode parses special tokens in text, as for every GGUF


def train(directory: Path) -> Path:
    """Train the sentencepiece model (sp.model in ``directory``)."""
    import sentencepiece as spm

    from porter.measure.text import python_reference

    text = python_reference(200_000) + ("\n" + EXTRA) * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(directory / "sp"), vocab_size=1000,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    return directory / "sp.model"


def _token_type(sp, i: int) -> int:
    """llama.cpp's token type of piece ``i`` (its converter's mapping of sentencepiece's)."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    return 5 if sp.is_unused(i) else 1


def write_stock_gguf(porter_file: Path, sp_model: Path, out: Path, **flags) -> Path:
    """``porter_file`` without porter's keys, its vocabulary the sentencepiece model's as llama.cpp's
    converter writes it; ``flags`` (add_bos_token=..., add_space_prefix=...) add those keys."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    reader = GGUFReader(porter_file)
    writer = GGUFWriter(out, "llama")
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "porter.", "tokenizer.")) or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = {"sub_type": field.types[-1]} if kind == GGUFValueType.ARRAY else {}
        writer.add_key_value(name, field.contents(), kind, **sub)
    n = sp.get_piece_size()
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([_token_type(sp, i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    for key, value in flags.items():
        writer.add_bool(f"tokenizer.ggml.{key}", value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out




def stock_spm_files(directory: Path) -> tuple[Path, Path]:
    """(stock GGUF with add_bos_token=True, add_eos_token=False; the sentencepiece model) in ``directory``."""
    import sentencepiece as spm

    from porter.pipeline import convert
    from porter.plugins import architectures
    from porter.testing.models import tiny_checkpoint

    sp_model = train(directory)
    cls = architectures()["llama"]
    vocab_size = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    ckpt = tiny_checkpoint(cls, directory / "ckpt", seed=0, vocab_size=vocab_size)
    convert(ckpt, directory / "porter.gguf", "f32", progress=False, force=True, arch_cls=cls)
    stock = write_stock_gguf(directory / "porter.gguf", sp_model, directory / "stock.gguf", add_bos_token=True,
                             add_eos_token=False)
    return stock, sp_model
