"""Real interruptions and a real full disk: a build either completes or leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mergekit_mode.toy import make_expert, make_model
from tests.conftest import write_recipe


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Big enough (about 80 MB out) that a build is still writing when the test interrupts it."""
    root = tmp_path_factory.mktemp("big")
    base = make_model(root / "base", hidden_size=256, intermediate_size=1024, num_layers=6, vocab_size=512)
    return base, [make_expert(base, root / f"e{i}", seed=i) for i in range(4)]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def staging(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.iterdir() if "mergekit-mode" in p.name]


def _interruptible() -> None:
    """In the child: Ctrl-C's default action back. A test run started in the background by a shell
    without job control inherits SIGINT ignored, and the build would rightly ignore it too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergekit_mode", str(recipe), str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped, Z: exited but not yet reaped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def start_stopped_while_writing(recipe: Path, out: Path, tmp_path: Path, tries: int = 5) -> subprocess.Popen:
    """A build frozen the moment its first shard appears, so a signal lands mid-write.

    On a loaded machine this test may not run again until the build has finished: SIGSTOP then
    reaches a process that has already exited (a zombie), and any signal after it is void. Such a
    try proves nothing either way, so the build is run again from scratch."""
    for _ in range(tries):
        proc = start(recipe, out)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(any(s.glob("*.safetensors")) for s in staging(tmp_path)):
                proc.send_signal(signal.SIGSTOP)
                while (state := _state(proc.pid)) not in "TZ":
                    time.sleep(0.001)
                if state == "T":
                    return proc
                break  # finished before it could be frozen: try again
            if proc.poll() is not None:
                break
            time.sleep(0.001)
        else:
            proc.kill()
            pytest.fail("build never started writing")
        _, err = proc.communicate()
        if proc.returncode != 0:
            pytest.fail(f"build failed: {err}")
        shutil.rmtree(out, ignore_errors=True)
    pytest.fail(f"the build finished before it could be frozen mid-write in {tries} tries")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_leaves_nothing(big, tmp_path, sig):
    base, experts = big
    recipe = write_recipe(tmp_path / "r.yml", base, experts, output={"shard_size": "5MB"})
    proc = start_stopped_while_writing(recipe, tmp_path / "out", tmp_path)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not staging(tmp_path)


def test_sigkill_then_rerun_gives_the_same_bytes(big, tmp_path):
    base, experts = big
    recipe = write_recipe(tmp_path / "r.yml", base, experts, router={"mode": "noisy"}, output={"shard_size": "5MB"})
    proc = start_stopped_while_writing(recipe, tmp_path / "out", tmp_path)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "out").exists() and staging(tmp_path)  # a killed run can't clean up...
    rerun = subprocess.run([sys.executable, "-m", "mergekit_mode", recipe, tmp_path / "out", "-q"], capture_output=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not staging(tmp_path)  # ...the next run takes its litter over
    clean = subprocess.run([sys.executable, "-m", "mergekit_mode", recipe, tmp_path / "clean", "-q"], capture_output=True)
    assert clean.returncode == 0
    assert digest(tmp_path / "out") == digest(tmp_path / "clean")


@pytest.fixture
def tmpfs(tmp_path):
    """A real size-limited filesystem; mounting needs root, which CI and the dev machines have."""
    mounts = []

    def mount(size: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs for the disk-full test: {done.stderr.decode().strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


def test_full_disk(llama, tmp_path, tmpfs, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts)
    dry = run_cli(recipe, tmp_path / "x", "--dry-run")
    tensor_bytes = int(dry.out.rsplit("(", 1)[1].split(" bytes")[0])
    # Too small from the start: refused before any work.
    small = tmpfs(64 * 1024)
    result = run_cli(recipe, small / "out", "-q")
    assert result.code == 2 and "free there" in result.err and not list(small.iterdir())
    # Room for the tensors but not for everything: the disk fills mid-build.
    tight = tmpfs(tensor_bytes + 16 * 1024)  # the shard's header and the side files won't fit
    result = run_cli(recipe, tight / "out", "-q")
    assert result.code == 2 and "no space left" in result.err, result.err
    assert not list(tight.iterdir())


def test_output_overlapping_an_input_is_refused(llama, tmp_path, run_cli):
    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts)
    for out in (llama.experts[0], llama.base.parent, llama.base / "sub"):
        result = run_cli(recipe, out, "-q", "--force")
        assert result.code == 2 and "overlaps input" in result.err, result.err
    assert (llama.base / "config.json").exists() and not (llama.base / "sub").exists()


def test_float16_overflow_is_named(llama, tmp_path, run_cli):
    import shutil

    hot = tmp_path / "hot"
    shutil.copytree(llama.experts[2], hot)
    tensors = load_file(hot / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.weight"][0, 0] = 1e6  # fine in float32, beyond float16's 65504
    save_file(tensors, hot / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yml", llama.base, [llama.experts[0], hot], dtype="float16")
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 2 and "model.layers.0.mlp.gate_proj.weight" in result.err and "overflows" in result.err
    assert not (tmp_path / "out").exists()


def test_concurrent_build_of_the_same_output_is_refused(llama, tmp_path, run_cli):
    import fcntl

    from mergekit_mode.writer import staging_dir

    recipe = write_recipe(tmp_path / "r.yml", llama.base, llama.experts)
    stage = staging_dir(tmp_path / "out")
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"partial")  # what the other run has written so far
    fd = os.open(stage, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the other run holds its staging folder
        result = run_cli(recipe, tmp_path / "out", "-q")
        assert result.code == 2 and "another mergekit-mode run" in result.err
        assert (stage / "model.safetensors").read_bytes() == b"partial"  # its work is untouched
    finally:
        os.close(fd)


def test_float16_overflow_from_a_lora_merge_is_named(llama, tmp_path, run_cli):
    from mergekit_mode.toy.adapters import make_adapter

    adapter = make_adapter(llama.base, tmp_path / "hot-lora", seed=1, r=2, lora_alpha=4, target_modules=["up_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = next(n for n in tensors if "layers.1.mlp.up_proj.lora_B" in n)
    tensors[name] = tensors[name] * 1e7  # every weight finite in the adapter; the merged one is not in float16
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"base_model: {llama.base}\ndtype: float16\nexperts:\n  - model: {llama.experts[0]}\n"
                      f"  - adapter: {adapter}\n")
    result = run_cli(recipe, tmp_path / "out", "-q")
    assert result.code == 2 and "model.layers.1.mlp.up_proj.weight" in result.err and "overflows" in result.err, result.err
    assert not (tmp_path / "out").exists()
