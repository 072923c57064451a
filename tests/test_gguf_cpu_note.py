"""export-gguf --outtype q8_0 warns, in one line, on CPUs where native llama.cpp builds crash loading q8_0."""
from __future__ import annotations

import pytest

from mergekit_mode import gguf

# The first flags line of /proc/cpuinfo on a Sapphire Rapids Xeon (shortened), and on this kind of AMD EPYC.
XEON_AMX = "flags\t\t: fpu vme sse4_2 avx avx2 fma f16c avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
EPYC = "flags\t\t: fpu vme sse4_2 avx avx2 fma f16c\n"
READ_FLAGS = gguf.cpu_flags  # the real reader, before a test replaces it


@pytest.mark.parametrize("text, has_amx", [(XEON_AMX, True), (EPYC, False)])
def test_cpu_flags_are_read_from_cpuinfo(tmp_path, text, has_amx):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: some CPU\n" + text + "processor\t: 1\n" + text)
    flags = gguf.cpu_flags(info)
    assert "avx2" in flags and ("amx_int8" in flags) == has_amx
    assert gguf.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("outtype, text, noted", [("q8_0", XEON_AMX, True), ("f16", XEON_AMX, False),
                                                  ("q8_0", EPYC, False)])
def test_export_q8_0_on_an_amx_cpu_says_which_builds_crash(llama, tmp_path, run_cli, monkeypatch, outtype, text,
                                                            noted):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    monkeypatch.setattr(gguf, "cpu_flags", lambda: READ_FLAGS(info))
    monkeypatch.delenv("LLAMA_CPP_CONVERTER", raising=False)
    monkeypatch.setenv("MERGEKIT_MODE_RUNTIMES", str(tmp_path / "empty"))  # no converter: stops after the note
    result = run_cli("export-gguf", llama.base, "--outtype", outtype, "--outfile", tmp_path / "x.gguf")
    assert result.code == 2
    notes = [line for line in result.err.splitlines() if line.startswith("note: ")]
    if noted:
        assert len(notes) == 1 and "AMX" in notes[0] and "q8_0" in notes[0] and "GGML_NATIVE=OFF" in notes[0]
    else:
        assert notes == []
