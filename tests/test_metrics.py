import errno
import glob
import json
import os
import sys
import time
import types

import numpy as np
import pytest
import torch

from rlvr import metrics
from rlvr.metrics import (Metrics, PhaseTimer, append_jsonl, peak_memory_gb, plot_curves, read_jsonl, reliability_plot,
                     reset_peak_memory, rewind_jsonl, wandb_mode)


def test_log_writes_plain_json_lines(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # disabled must not even import wandb
    m = Metrics(str(tmp_path), {"lr": 1e-6, "model": "tiny"}, "proj", "run", mode="disabled", rank=0)
    m.log(1, {"reward": torch.tensor(0.5), "kl": np.float32(0.25), "tokens": 7, "loss": 1.5})
    m.log(2, {"reward": torch.tensor([0.75])})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["reward"] == 0.5 and rows[0]["kl"] == 0.25 and rows[0]["tokens"] == 7 and rows[0]["loss"] == 1.5
    assert type(rows[0]["reward"]) is float and rows[1]["reward"] == 0.75
    assert abs(rows[0]["time"] - time.time()) < 60 and rows[1]["elapsed"] >= rows[0]["elapsed"] >= 0
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-6, "model": "tiny"}
    with pytest.raises(ValueError, match="'reward'"):
        m.log(3, {"reward": torch.zeros(2)})
    m.table(1, "samples", ["question", "response", "reward"], [["1+1?", "2", torch.tensor(1.0)], ["2+2?", "5", 0.0]])
    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 1, "question": "1+1?", "response": "2", "reward": 1.0},
        {"step": 1, "question": "2+2?", "response": "5", "reward": 0.0}]
    m.close()
    assert m.where() == f"metrics in {tmp_path / 'metrics.jsonl'}"


def test_other_ranks_write_nothing(tmp_path):
    out = tmp_path / "run"
    m = Metrics(str(out), {}, "proj", "run", mode="offline", rank=1)
    m.log(1, {"x": 1.0})
    m.table(1, "samples", ["a"], [["b"]])
    m.close()
    assert not out.exists()


def test_wandb_failure_warns_and_keeps_local_files_without_leaking_the_key(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        raise RuntimeError("authentication failed for key secret-key-123")

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    m = Metrics(str(tmp_path), {}, "proj", "run", mode="online")
    m.log(1, {"x": 2.0})
    err = capsys.readouterr().err
    assert "warning" in err and "secret-key-123" not in err and "***" in err
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["x"] == 2.0


def test_wandb_mode_resolution(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    nothing = {"NETRC": str(tmp_path / "none")}
    assert wandb_mode("auto", nothing) == "offline"
    assert wandb_mode("auto", {**nothing, "WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode("auto", {"NETRC": str(netrc)}) == "online"
    assert wandb_mode("auto", {"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    with pytest.raises(ValueError, match="wandb mode"):
        wandb_mode("cloud", {})


def test_offline_wandb_run_is_written_locally(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    m = Metrics(str(tmp_path), {"lr": 0.1}, "proj", "offline-test", mode="auto")
    assert m.run is not None and m.run.offline
    m.log(1, {"reward": 0.5})
    m.table(1, "samples", ["q", "r"], [["a", "b"]])
    m.log(2, {"reward": 0.75})
    m.close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))
    assert f"wandb sync {runs[0]}" in capsys.readouterr().out
    assert [r["reward"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0.5, 0.75]


def test_summary_line():
    line = Metrics.summary(12, {"reward": 0.4123, "kl": torch.tensor(0.002), "tiny": 1.234e-5, "tok/s": 12345.6,
                                "n": 64, "loss": 2.0, "bad": float("nan")})
    assert line == "step 12 | reward 0.412 | kl 0.002 | tiny 1.23e-05 | tok/s 12346 | n 64 | loss 2 | bad nan"
    assert Metrics.summary(3, {"reward": 0.5, "kl": 0.1}, ["kl", "missing"]) == "step 3 | kl 0.1"


def test_phase_timer_accumulates_and_pops():
    timer = PhaseTimer("cpu")
    with timer("generate"):
        time.sleep(0.03)
    with timer("generate"):
        time.sleep(0.03)
    with pytest.raises(KeyError):
        with timer("update"):
            time.sleep(0.01)
            raise KeyError("a failing phase is still timed")
    times = timer.pop()
    assert set(times) == {"time/generate", "time/update"}
    # sleeps last at least as long as asked; a busy machine only makes them longer, so only lower bounds
    # are facts. Accumulated, not overwritten: generate holds both of its sleeps.
    assert times["time/generate"] >= 0.06 and times["time/update"] >= 0.01
    assert timer.pop() == {}


def test_peak_memory_cpu_rises_and_resets():
    import mmap

    reset_peak_memory("cpu")
    base = peak_memory_gb("cpu")
    # 64 MiB of new pages, touched: an mmap of its own, where a tensor could reuse memory an earlier test in
    # this process freed but the allocator kept resident (the peak then does not move: an order-dependent test)
    block = mmap.mmap(-1, 64 * 2**20)
    for at in range(0, len(block), 4096):
        block[at] = 1
    high = peak_memory_gb("cpu")
    assert high - base >= 0.055
    block.close()
    if reset_peak_memory("cpu"):  # Linux can reset the peak
        assert peak_memory_gb("cpu") < high - 0.05


# ----------------------------------------------------------------------------------------------
# append-only JSONL: durable appends, torn lines, rewind on resume

def test_append_jsonl_writes_once_and_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(metrics.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_size), fsync(fd)))
    append_jsonl(str(path), [{"step": 1, "a": "é"}, {"step": 1, "a": 2.5}])
    append_jsonl(str(path), [])  # nothing to write: no empty write, no fsync
    append_jsonl(str(path), [{"step": 2, "x": None}])
    assert path.read_text() == '{"step": 1, "a": "\\u00e9"}\n{"step": 1, "a": 2.5}\n{"step": 2, "x": null}\n'
    assert synced == [len('{"step": 1, "a": "\\u00e9"}\n{"step": 1, "a": 2.5}\n'), path.stat().st_size]


def test_read_jsonl_cuts_off_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "rollouts.jsonl"
    good = b'{"step": 1, "r": 0.5}\n{"step": 2, "r": "\xc3\xa9"}\n'
    for torn in [b'{"step": 3, "r": 0.', b'{"step": 3}', b'{"step": 3, "r": "\xc3', b'{"step": 3, "r\n', b"\0\0\0"]:
        path.write_bytes(good + torn)
        assert read_jsonl(str(path)) == [{"step": 1, "r": 0.5}, {"step": 2, "r": "é"}], torn
        assert path.read_bytes() == good  # repaired on disk, so appends start on a fresh line
        err = capsys.readouterr().err
        assert f"{path}: cut off a last line torn by a crash ({len(torn)} bytes" in err, err
    append_jsonl(str(path), [{"step": 3}])
    assert read_jsonl(str(path))[-1] == {"step": 3} and capsys.readouterr().err == ""


def test_read_jsonl_bad_line_elsewhere_is_an_error_naming_file_and_row(tmp_path):
    path = tmp_path / "samples.jsonl"
    text = b'{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n'
    path.write_bytes(text)
    with pytest.raises(ValueError, match=f"{path}: row 2: not a JSON object"):
        read_jsonl(str(path))
    path.write_bytes(b'{"step": 1}\n[1, 2]\n{"step": 3}')  # a torn last line does not excuse a bad middle one
    with pytest.raises(ValueError, match="row 2: not a JSON object .a JSON list"):
        read_jsonl(str(path))
    assert path.read_bytes() == b'{"step": 1}\n[1, 2]\n{"step": 3}'  # untouched: a person must look


def test_rewind_jsonl_keeps_steps_up_to_s_byte_for_byte(tmp_path):
    path = tmp_path / "metrics.jsonl"
    kept = b'{"step": 0, "eval": 0.25}\n{"step": 1,   "x": 1}\n{"step": 2, "x": 0.1}\n{"step": 2, "y": 2}\n'
    path.write_bytes(kept + b'{"step": 3, "x": 3}\n{"step": 4, "x": 4}\n{"step": 5, "x"')
    assert rewind_jsonl(str(path), 2) == 2  # steps 3 and 4; the torn line is not a row
    assert path.read_bytes() == kept and sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    assert rewind_jsonl(str(path), 2) == 0 and path.read_bytes() == kept
    assert rewind_jsonl(str(tmp_path / "absent.jsonl"), 2) == 0
    path.write_bytes(b'{"step": 1}\n{"no_step": 1}\n')
    with pytest.raises(ValueError, match=f'{path}: row 2: no integer "step"'):
        rewind_jsonl(str(path), 5)


def run_steps(m: Metrics, steps):
    for step in steps:
        m.table(step, "samples", ["question", "reward"], [[f"q{step}a", step / 10], [f"q{step}b", 0.0]])
        if step % 2 == 0:
            m.table(step, "audit", ["agree"], [[step % 4 == 0]])
        m.log(step, {"reward": step / 10, "loss": torch.tensor(1.0 / step)})


def without_time(path):
    return [{k: v for k, v in row.items() if k not in ("time", "elapsed")} for row in read_jsonl(str(path))]


def test_resumed_run_files_equal_an_uninterrupted_run(tmp_path):
    """Killed while writing step 6 (steps 1-5 logged, two files' last lines torn), resumed from the
    checkpoint of step 3: every file equals an uninterrupted run's, apart from the time fields."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    m = Metrics(str(whole), {}, "p", "r", mode="disabled")
    run_steps(m, range(1, 8))
    m.close()

    m = Metrics(str(resumed), {}, "p", "r", mode="disabled")
    run_steps(m, range(1, 6))
    for name in ("metrics", "samples"):  # the kill tore the last line of two files
        with open(resumed / f"{name}.jsonl", "ab") as f:
            f.write(b'{"step": 6, "quest')
    m = Metrics(str(resumed), {}, "p", "r", mode="disabled", resume_step=3)
    assert [r["step"] for r in read_jsonl(str(resumed / "metrics.jsonl"))] == [1, 2, 3]  # before any log
    run_steps(m, range(4, 8))
    m.close()
    names = sorted(os.listdir(whole))
    assert names == sorted(os.listdir(resumed)) == ["audit.jsonl", "config.json", "metrics.jsonl", "samples.jsonl"]
    for name in ["audit.jsonl", "metrics.jsonl", "samples.jsonl"]:
        assert without_time(resumed / name) == without_time(whole / name), name
    assert [r["step"] for r in read_jsonl(str(resumed / "metrics.jsonl"))] == list(range(1, 8))


# ----------------------------------------------------------------------------------------------
# figures

def test_plot_curves_writes_a_png_of_the_expected_size(tmp_path):
    import matplotlib.image

    path = plot_curves(tmp_path / "curves.png", {"reward": ([1, 2, 3], [0.1, 0.4, 0.3]), "eval": ([1, 3], [0.5, 0.6])},
                       "step", "mean", "toy run")
    image = matplotlib.image.imread(path)
    assert path == str(tmp_path / "curves.png") and image.shape[:2] == (450, 700)
    assert (image[..., :3] < 0.5).any()  # something is drawn
    with pytest.raises(ValueError, match="curve 'reward' .* 3 x values and 2 y values"):
        plot_curves(tmp_path / "bad.png", {"reward": ([1, 2, 3], [0.1, 0.4])}, "step", "mean", "bad")


def test_reliability_plot_writes_a_png_of_the_expected_size(tmp_path):
    import matplotlib.image

    bins = [{"lo": b / 10, "hi": (b + 1) / 10, "count": c, "mean_p": (b + 0.5) / 10 if c else None,
             "frac_positive": (b + 0.2) / 10 if c else None} for b, c in enumerate([9, 0, 3, 0, 0, 0, 0, 4, 0, 20])]
    path = reliability_plot(str(tmp_path / "reliability.png"), bins)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (500, 500)
    blue = (image[..., 2] > 0.6) & (image[..., 0] < 0.5)  # the bars
    red = (image[..., 0] > 0.7) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)  # the mean-p ticks
    assert blue.sum() > 2000 and red.sum() > 100


def test_a_full_disk_names_the_file(tmp_path):
    # /dev/full: every write fails with ENOSPC, as on a full disk
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError) as e:
        metrics.append_jsonl(tmp_path / "metrics.jsonl", [{"step": 1}])
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"[Errno 28] No space left on device (appending 1 rows): '{tmp_path / 'metrics.jsonl'}'"


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def __init__(self, id):
            self.id = id

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(kw) or FakeRun(kw["id"] or f"new{len(calls)}")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    Metrics(str(tmp_path), {}, "proj", "run", mode="offline").run.finish()
    assert calls[0]["id"] is None and calls[0]["resume"] is None
    assert (tmp_path / "wandb_run_id").read_text() == "new1\n"
    resumed = Metrics(str(tmp_path), {}, "proj", "run", mode="offline", resume_step=7)
    assert (calls[1]["id"], calls[1]["resume"], resumed.run.id) == ("new1", "allow", "new1")
    Metrics(str(tmp_path), {}, "proj", "run", mode="offline", resume_step=0)  # a fresh start is a new run
    assert calls[2]["id"] is None and (tmp_path / "wandb_run_id").read_text() == "new3\n"


def test_plot_run_draws_the_panels_it_has_data_for(tmp_path):
    import matplotlib.image

    rows = [{"step": 0, "eval/accuracy": 0.4, "eval/accuracy/math": 0.3, "verifier/master_key_fpr": 0.0}]
    rows += [{"step": s, "reward/mean": 0.1 * s, "reward/binary_mean": 0.05 * s, "reward/rule:substring/binary_mean": 0.2,
              "entropy": 2.0 - 0.1 * s, "response/length_mean": 10 + s, "loss": 0.1} for s in range(1, 6)]
    rows[-1].update({"eval/accuracy": 0.5, "eval/accuracy/math": 0.45, "audit/false_positive_rate": 0.1})
    path = metrics.plot_run(tmp_path / "curves.png", rows, title="demo")
    image = matplotlib.image.imread(path)[..., :3]
    assert image.shape[:2] == (700, 1200)
    # tab:blue (31, 119, 180), the first curve's colour, in five panels; the KL panel (row 2, column 1) has none
    blue = (abs(image - np.array([31, 119, 180]) / 255).max(-1) < 0.05)
    panels = [blue[r * 350:(r + 1) * 350, c * 400:(c + 1) * 400].sum() for r in range(2) for c in range(3)]
    assert [p > 20 for p in panels] == [True, True, True, False, True, True], panels
