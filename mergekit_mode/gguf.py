"""Export a model folder (any output format) to GGUF with llama.cpp's own converter.

mergekit-mode does not ship or reimplement llama.cpp's converter: it runs
llama.cpp's `convert_hf_to_gguf.py` (with llama.cpp's `gguf-py` beside it) in a
subprocess. Where the converter is looked for, in order:

1. `$LLAMA_CPP_CONVERTER`: path to `convert_hf_to_gguf.py` (a llama.cpp checkout or
   an unpacked llama-cpp-python sdist, `vendor/llama.cpp/`);
2. `$MERGEKIT_MODE_RUNTIMES/llama.cpp/convert_hf_to_gguf.py` (default
   `~/.cache/mergekit-mode/runtimes`), where `.ci/setup-runtimes` puts it.

`gguf-py` is taken from the converter's folder (`gguf-py/`) when there, else the
`gguf` package must be importable by the Python that runs the converter.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mergekit_mode.errors import ModeError
from mergekit_mode.formats import output_architectures
from mergekit_mode.inputs import ModelFolder
from mergekit_mode.safety import check_name_lengths, contains

__all__ = ["OUTTYPES", "ConverterNotFoundError", "GGUFExportError", "cpu_flags", "export_gguf", "find_converter",
           "outtype_note"]

OUTTYPES = ("f16", "bf16", "q8_0", "f32")

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the llama.cpp release tested (as vendored in llama-cpp-python)

HOW_TO_GET = (
    "llama.cpp's convert_hf_to_gguf.py was not found. Get it with one of:\n"
    "  - .ci/setup-runtimes llama.cpp   (from a mergekit-mode checkout; caches it under "
    "$MERGEKIT_MODE_RUNTIMES or ~/.cache/mergekit-mode/runtimes)\n"
    f"  - pip download --no-deps --no-binary llama-cpp-python llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}\n"
    f"    tar xzf llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz\n"
    f"    export LLAMA_CPP_CONVERTER=$PWD/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    "/vendor/llama.cpp/convert_hf_to_gguf.py\n"
    "  - or a llama.cpp checkout: export LLAMA_CPP_CONVERTER=/path/to/llama.cpp/convert_hf_to_gguf.py\n"
    "The converter needs torch, numpy, sentencepiece, safetensors, pyyaml, tqdm and requests."
)


# Native llama.cpp builds on a CPU with AMX compile its AMX backend, which repacks q8_0 weights and
# crashes (SIGSEGV) loading any q8_0 GGUF; no upstream fix as of llama.cpp in llama-cpp-python
# 0.3.36 (docs/compatibility.md). The file itself is fine: the note says which builds can load it.
AMX_Q8_0_NOTE = (
    "this CPU has AMX: llama.cpp builds made for it with the AMX backend (the default -march=native "
    "build, e.g. a plain `pip install llama-cpp-python`) crash loading q8_0 GGUFs; load this file with a "
    "build made with CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" or use "
    "f16/bf16 (docs/compatibility.md)"
)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where there is no /proc/cpuinfo)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def outtype_note(outtype: str, flags: set[str]) -> str | None:
    """A one-line note about loading an export of `outtype` on a CPU with these flags, or None."""
    return AMX_Q8_0_NOTE if outtype == "q8_0" and "amx_int8" in flags else None


class ConverterNotFoundError(FileNotFoundError):
    """llama.cpp's convert_hf_to_gguf.py is not available."""


class GGUFExportError(RuntimeError):
    """The converter ran and failed."""


def runtimes_dir() -> Path:
    env = os.environ.get("MERGEKIT_MODE_RUNTIMES")
    return Path(env) if env else Path.home() / ".cache" / "mergekit-mode" / "runtimes"


def find_converter() -> Path | None:
    """Path of convert_hf_to_gguf.py, or None. A set but wrong $LLAMA_CPP_CONVERTER raises."""
    env = os.environ.get("LLAMA_CPP_CONVERTER")
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            p = p / "convert_hf_to_gguf.py"
        if not p.is_file():
            raise ConverterNotFoundError(f"LLAMA_CPP_CONVERTER={env}: no such file.\n" + HOW_TO_GET)
        return p.resolve()
    p = runtimes_dir() / "llama.cpp" / "convert_hf_to_gguf.py"
    return p.resolve() if p.is_file() else None


def _converter_env(converter: Path) -> dict[str, str]:
    env = dict(os.environ)
    gguf_py = converter.parent / "gguf-py"
    if gguf_py.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_py), env.get("PYTHONPATH")]))
    # (the converter also puts its own gguf-py first on sys.path unless NO_LOCAL_GGUF is set)
    return env


def export_gguf(
    model_dir: Path | str,
    out_file: Path | str,
    outtype: str = "f16",
    *,
    python: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Convert a Hugging Face model folder (an output of any format) to one GGUF file.

    outtype: f16 | bf16 | q8_0 | f32. `python` runs the converter (default: this one).
    Raises ConverterNotFoundError when llama.cpp's converter is not found, ModeError when the
    folder or the file is refused (check_exportable, check_outfile), and GGUFExportError (with the
    converter's last output lines) when it fails.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json)")
    converter = find_converter()
    if converter is None:
        raise ConverterNotFoundError(HOW_TO_GET)
    check_exportable(model_dir)
    check_outfile(model_dir, out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # The converter writes as it goes: it converts into a private folder made here (no one else can
    # plant a link in it) and the file is renamed into place when complete, so a failed or
    # interrupted export never leaves a truncated .gguf that looks finished, nor writes elsewhere.
    work = Path(tempfile.mkdtemp(prefix=f".{out_file.name}.partial-", dir=out_file.parent))
    partial = work / out_file.name
    cmd = [python or sys.executable, str(converter), str(model_dir), "--outfile", str(partial), "--outtype", outtype]
    try:
        with subprocess.Popen(cmd, env=_converter_env(converter), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as p:
            try:
                stdout, stderr = p.communicate(timeout=timeout)
            except BaseException:  # a timeout, Ctrl-C, SIGTERM/SIGHUP...: the converter goes too
                p.kill()
                p.wait()
                raise
        if p.returncode != 0 or not partial.is_file():
            tail = "\n".join((stdout + "\n" + stderr).strip().splitlines()[-30:])
            raise GGUFExportError(
                f"llama.cpp's converter ({converter}) failed on {model_dir} (exit {p.returncode}):\n{tail}"
            )
        partial.rename(out_file)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_file


def check_exportable(model_dir: Path) -> None:
    """Refuse, before llama.cpp's converter sees it, a folder that could make it run code: the
    converter passes trust_remote_code=True for some architectures, so a folder must be one of the
    architectures mergekit-mode writes, hold safetensors only, and carry no auto_map and no .py."""
    folder = ModelFolder.open_to_load(model_dir, "MODEL", scripts=True)
    known = output_architectures()
    archs = folder.config.get("architectures")
    if not isinstance(archs, list) or not archs or any(a not in known for a in archs):
        raise ModeError(f"MODEL: {model_dir / 'config.json'}: architectures {archs!r}; export-gguf converts what "
                        f"mergekit-mode writes ({', '.join(known)})")


def check_outfile(model_dir: Path, out_file: Path) -> None:
    """The GGUF file goes to a plain file name outside the folder it is made from."""
    check_name_lengths(out_file, "--outfile")
    if out_file.is_symlink():
        raise ModeError(f"--outfile: {out_file} is a symlink; give the real path")
    if out_file.is_dir():
        raise ModeError(f"--outfile: {out_file} is a folder; give a file name (e.g. {out_file / 'model.gguf'})")
    if contains(model_dir, out_file):
        raise ModeError(f"--outfile: {out_file} is inside MODEL ({model_dir}), which the export reads; write it "
                        "elsewhere")
