"""Where numbers go: `metrics.jsonl` (always), wandb (when it can), the console line, phase timings,
peak memory and figures (matplotlib).

Only rank 0 writes. Nothing here needs a wandb account: without credentials, network or the wandb
package, runs log to local files (and, in offline mode, a local wandb run to `wandb sync` later).

The JSONL files are append-only and crash-consistent: each append is one write followed by fsync; a
line torn by a crash is cut off when the file is next read; a resumed run first cuts every file back
to the rows of the steps its checkpoint holds (`resume_step`), so its files equal those of a run that
never stopped (apart from the time fields).

    metrics = Metrics(out_dir, config, project="rlvr", run_name="toy", mode="auto", rank=rank,
                      resume_step=None)   # or the step of the checkpoint the run resumed from
    timer = PhaseTimer(device)
    with timer("generate"): ...
    scalars = {"reward": r, **timer.pop(), **peak_memory(device)}
    metrics.log(step, scalars)
    bar.set_postfix_str(Metrics.summary(step, scalars, ["reward", "kl"]))
    metrics.close()
"""

import contextlib
import json
import math
import netrc
import os
import re
import resource
import sys
import time
from collections import defaultdict
from urllib.parse import urlsplit

import torch

from rlvr import remote, rundir


def _plain(value, where: str):
    """A JSON-ready Python value: tensors and numpy scalars become floats (or ints), text stays text."""
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metrics: {where} is a tensor of shape {tuple(value.shape)}, expected one number")
        value = value.item()
        return value if isinstance(value, (bool, int)) else float(value)
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
        return value if isinstance(value, (str, bool, int)) else float(value)
    if isinstance(value, float):
        return value
    raise TypeError(f"metrics: {where} has type {type(value).__name__}; log numbers, tensors of one element or text")


def wandb_mode(mode: str, environ=os.environ) -> str:
    """Resolve "auto" to "online" when wandb credentials exist (WANDB_API_KEY, or a netrc entry for
    the wandb host), else "offline"; an explicit WANDB_MODE in the environment decides "auto" too.
    "online", "offline" and "disabled" are returned as given."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"metrics: wandb mode must be auto, online, offline or disabled, got {mode!r}")
    if mode != "auto":
        return mode
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    if environ.get("WANDB_API_KEY"):
        return "online"
    host = urlsplit(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        entry = netrc.netrc(environ.get("NETRC") or os.path.expanduser("~/.netrc")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        entry = None
    return "online" if entry else "offline"


def _redact(text: str, environ=os.environ) -> str:
    """Without the wandb and verifier API keys and any URL's credentials."""
    for key in (environ.get("WANDB_API_KEY"), environ.get(remote.API_KEY_ENV)):
        text = text.replace(key, "***") if key else text
    return remote.redact(text)


# ----------------------------------------------------------------------------------------------
# append-only JSONL files (metrics, samples, rollouts, audits): durable appends, repair, rewind

def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append rows as JSON lines in one write, then flush and fsync: a crash can tear only the last
    line, which `read_jsonl` cuts off."""
    if not rows:
        return
    rundir.note(path)  # listed before it exists: --overwrite removes it, and only what runs wrote
    try:
        with open(path, "ab") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows).encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a failed write names no file: a full disk would read "No space left on device" alone
        raise OSError(e.errno, f"{e.strerror or e} (appending {len(rows)} rows)", os.fspath(path)) from e


def _lines(path: str | os.PathLike) -> list[tuple[bytes, dict]]:
    """Each line of a JSONL file (with its newline) and its row. A last line torn by a crash (no
    trailing newline, or not a JSON object) is cut off the file, with a warning; a bad line anywhere
    else is a ValueError naming the file and row."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn = lines.pop()  # what follows the last newline: empty unless a crash tore the last line
    out = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)  # bytes: a torn UTF-8 character is a ValueError too
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:
            if i < len(lines) or torn:
                raise ValueError(f"{path}: row {i}: not a JSON object ({e})") from None
            torn = line + b"\n"
            break
        out.append((line + b"\n", row))
    if torn:
        print(f"[metrics] warning: {path}: cut off a last line torn by a crash ({len(torn)} bytes: "
              f"{torn[:80]!r})", file=sys.stderr, flush=True)
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(torn))
            os.fsync(f.fileno())
    return out


def check_jsonl(path: str | os.PathLike, step: int) -> None:
    """Before a run resumes from the checkpoint of `step`: ValueError naming `path` and its first line that is
    not a JSON object with an integer "step" (a last line torn by a crash aside: it is cut off as usual),
    with the last good step before it and how to keep the good lines. A missing file passes."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    torn, last, n = lines.pop(), 0, len(lines)  # a last line without its newline was torn by a crash
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int)
        except ValueError:
            ok = False
        if ok:
            last = row["step"]
        elif i < n or torn:  # the last line itself may be torn (a crash mid-write): _lines cuts it off
            lost = f"; steps {last + 1}..{step} of it would be lost" if last < step else ""
            raise ValueError(f"{path}: line {i} is not a JSON row with a step ({line[:60]!r}); the last good step "
                             f"before it is {last}: keep the lines before it (head -n {i - 1} {path} > {path}.good "
                             f"&& mv {path}.good {path}) and --resume again{lost}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file, after cutting off a last line torn by a crash (see `_lines`)."""
    return [row for _, row in _lines(path)]


def rewind_jsonl(path: str | os.PathLike, step: int) -> int:
    """Cut a JSONL file back to its rows with row["step"] <= step (a torn last line is cut first);
    returns how many rows were dropped. A missing file has none. The kept lines are written byte for
    byte to a temporary file that os.replace puts in place: a crash leaves the old file or the new."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    lines = _lines(path)
    keep = []
    for i, (line, row) in enumerate(lines, 1):
        if not isinstance(row.get("step"), int):
            raise ValueError(f"{path}: row {i}: no integer \"step\" to rewind by (got {row.get('step')!r})")
        if row["step"] <= step:
            keep.append(line)
    if len(keep) < len(lines):
        rundir.note(path + ".tmp")
        with open(path + ".tmp", "wb") as f:
            f.write(b"".join(keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)  # if the rename is lost in a crash, the next resume rewinds again
    return len(lines) - len(keep)


class Metrics:
    """One per run. `log` appends a JSON line to `out_dir/metrics.jsonl` and logs to wandb;
    `table` records samples; `close` finishes and says where everything went.

    A run resumed from the checkpoint of step S passes resume_step=S: metrics.jsonl, and each table
    file when it is first written again, are cut back to the rows of steps <= S before anything is
    appended, so a killed and resumed run's files equal an uninterrupted run's (apart from "time" and
    "elapsed"). The trainer must not log step S again."""

    def __init__(self, out_dir: str, config: dict, project: str, run_name: str, mode: str = "auto",
                 rank: int = 0, resume_step: int | None = None):
        self.rank, self.out_dir, self.run, self.resume_step = rank, out_dir, None, resume_step
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.start = time.time()
        self._rewound: set[str] = set()  # files already cut back to resume_step
        if rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._rewind_once(self.path)
        config = json.loads(remote.redact(json.dumps(config, default=str)))  # config.json and wandb: no URL credentials
        rundir.note(os.path.join(out_dir, "config.json"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:  # the local files describe the run alone
            json.dump(config, f, indent=2, default=str)
        mode = wandb_mode(mode)
        if mode == "disabled":
            return
        # a resumed run continues its wandb run (the id is kept in out_dir), not a second one
        id_file = os.path.join(out_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if resume_step and os.path.exists(id_file) else None
        rundir.note(id_file)
        rundir.note(os.path.join(out_dir, "wandb"))  # wandb.init(dir=out_dir) writes there
        try:
            import wandb

            self.run = wandb.init(project=project, name=run_name, config=config, dir=out_dir, mode=mode, id=run_id,
                                  resume="allow" if run_id else None)
            with open(id_file, "w") as f:
                f.write(self.run.id + "\n")
        except Exception as e:  # no package, no account, no network: local files still work
            print(f"[metrics] warning: wandb ({mode}) unavailable, logging to {self.path} only: "
                  f"{_redact(f'{type(e).__name__}: {e}')}", file=sys.stderr, flush=True)
            self.run = None

    def log(self, step: int, scalars: dict) -> None:
        if self.rank != 0:
            return
        row = {k: _plain(v, f"scalar {k!r}") for k, v in scalars.items()}
        now = time.time()
        self._append(self.path, [{"step": step, "time": now, "elapsed": now - self.start, **row}])
        if self.run is not None:
            self.run.log(row, step=step)

    def table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        """Sample rows (e.g. question, reference, response, reward) to `out_dir/{name}.jsonl` and a wandb
        Table. Log tables before or with the step's scalars: wandb drops data for an earlier step."""
        if self.rank != 0:
            return
        if not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"metrics: table name {name!r} must be a plain file name (letters, digits, _ . -)")
        rows = [[_plain(v, f"table {name!r} column {c!r}") for c, v in zip(columns, row, strict=True)]
                for row in rows]
        self._append(os.path.join(self.out_dir, f"{name}.jsonl"),
                     [{"step": step, **dict(zip(columns, row))} for row in rows])
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Table(columns=list(columns), data=rows)}, step=step)

    def _rewind_once(self, path: str) -> None:
        if self.resume_step is None or path in self._rewound:
            return
        self._rewound.add(path)
        dropped = rewind_jsonl(path, self.resume_step)
        if dropped:
            print(f"[metrics] resumed after step {self.resume_step}: dropped {dropped} rows of later steps "
                  f"from {path}", file=sys.stderr, flush=True)

    def _append(self, path: str, rows: list[dict]) -> None:
        self._rewind_once(path)
        append_jsonl(path, rows)

    @staticmethod
    def summary(step: int, scalars: dict, keys: list[str] | None = None) -> str:
        """`step 12 | reward 0.41 | kl 0.002`: the chosen keys (all by default; missing ones skipped)."""
        parts = [f"step {step}"]
        for k in keys if keys is not None else list(scalars):
            if k in scalars:
                parts.append(f"{k} {_fmt(_plain(scalars[k], f'scalar {k!r}'))}")
        return " | ".join(parts)

    def where(self) -> str:
        """Where this run's numbers are, in one sentence."""
        text = f"metrics in {self.path}"
        if self.run is not None:
            if self.run.offline:
                text += f"; wandb offline run in {os.path.dirname(self.run.dir)} (upload: wandb sync " \
                        f"{os.path.dirname(self.run.dir)})"
            else:
                text += f"; wandb {self.run.url}"
        return text

    def plot(self) -> str | None:
        """Rank 0: the picture of the run so far (plot_run of metrics.jsonl) at out_dir/curves.png; returns
        its path. A figure that cannot be drawn is a warning: the run goes on."""
        if self.rank != 0:
            return None
        path = os.path.join(self.out_dir, "curves.png")
        try:
            return plot_run(path, read_jsonl(self.path), title=os.path.basename(os.path.normpath(self.out_dir)))
        except Exception as e:  # matplotlib missing or a font cache error: never stop training for a figure
            print(f"[metrics] warning: could not draw {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return None

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.run is not None:
            self.run.finish()
        print(f"[metrics] {self.where()}", flush=True)


def _fmt(value) -> str:
    """Compact numbers for the console: 0.41, 0.002, 1.23e-05, 12.3, 4096."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000 or value == int(value):
            return f"{value:.0f}" if abs(value) < 1e7 else f"{value:.3g}"
        return f"{value:.3g}"
    return str(value)


def progress(iterable, desc: str, disable: bool = False, **kwargs):
    """A tqdm bar on a terminal only: redirected to a file, its redraws would be most of the log (the
    callers print one line per step there instead)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=disable or not sys.stderr.isatty(), **kwargs)


# ----------------------------------------------------------------------------------------------
# phase timing and memory

class PhaseTimer:
    """Seconds per phase of a step: `with timer("generate"): ...` accumulates, `pop()` returns
    {"time/generate": s, ...} and starts over. On CUDA it synchronises at both ends, so a phase's
    time is its kernels' time and not the launch time."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = defaultdict(float)
        return out


def _vm_hwm_kb() -> int | None:
    """Peak resident memory since the last reset (Linux), in kB."""
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return None


def peak_memory_gb(device: torch.device | str = "cpu") -> float:
    """Peak memory since the last `reset_peak_memory`: CUDA allocated by torch, else the process's
    peak resident set (Linux VmHWM, which can be reset; elsewhere getrusage, peak of the whole run)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = _vm_hwm_kb()
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = kb / 1024 if sys.platform == "darwin" else kb  # macOS reports bytes
    return kb / 2**20


def peak_memory(device: torch.device | str = "cpu") -> dict:
    """The step's memory figures. On CUDA, memory/peak_gb (torch's allocated tensors) leaves out what
    the caching allocator holds (memory/peak_reserved_gb: what an out-of-memory error is about) and
    what is outside torch (NCCL buffers, the CUDA context, other processes: memory/device_used_gb, the
    whole device's use now). On CPU: the peak resident set (peak_memory_gb)."""
    device = torch.device(device)
    out = {"memory/peak_gb": peak_memory_gb(device)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out.update({"memory/peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
                    "memory/device_used_gb": (total - free) / 2**30})
    return out


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """Start `peak_memory_gb` over. Returns whether it could: False where the CPU peak is the whole
    run's (not Linux), so a peak measured after it is not the peak of what followed alone."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_hwm_kb() is not None


# ----------------------------------------------------------------------------------------------
# figures: matplotlib's Agg canvas, no display and no pyplot state (imported here: only figures need it)

DPI = 100


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> str:
    """PNG of exactly figsize * DPI pixels (no tight bounding box, which would change the size)."""
    fig.tight_layout()
    rundir.note(path)
    fig.savefig(path, dpi=DPI, format="png")
    return str(path)


def plot_curves(path, curves: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str) -> str:
    """Line plot of named curves {label: (xs, ys)}, e.g. reward and held-out accuracy against the step,
    as a 700 x 450 PNG at `path`. Returns the path."""
    if not curves:
        raise ValueError(f"metrics: no curves to plot in {path}")
    fig, ax = _figure(7, 4.5)
    for label, (xs, ys) in curves.items():
        if len(xs) != len(ys):
            raise ValueError(f"metrics: curve {label!r} for {path} has {len(xs)} x values and {len(ys)} y values")
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def reliability_plot(path, bins: list[dict]) -> str:
    """The reliability diagram of a verifier's p(YES) against labels, as a 500 x 500 PNG at `path`,
    from calibration bins [{"lo", "hi", "count", "mean_p", "frac_positive"}] (empty bins: count 0).
    Bars: each non-empty bin's fraction of rows labelled correct, its row count on top; red ticks: the
    bin's mean p(YES) (a calibrated verifier's bars reach their ticks); dashed: perfect calibration."""
    full = [b for b in bins if b["count"]]
    fig, ax = _figure(5, 5)
    ax.bar([b["lo"] for b in full], [b["frac_positive"] for b in full], width=[b["hi"] - b["lo"] for b in full],
           align="edge", color="tab:blue", alpha=0.7, edgecolor="white", label="fraction labelled correct")
    ax.hlines([b["mean_p"] for b in full], [b["lo"] for b in full], [b["hi"] for b in full], colors="tab:red",
              linewidth=2.5, label="mean p(YES) of the bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    for b in full:
        ax.annotate(str(b["count"]), ((b["lo"] + b["hi"]) / 2, max(b["frac_positive"], b["mean_p"])),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1.1), xlabel="p(YES) from the verifier", ylabel="fraction labelled correct")
    ax.set_title(f"Reliability diagram: {sum(b['count'] for b in bins)} rows (on each bar: its rows)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


# The panels of a run's picture: (title, the metrics.jsonl keys it draws, as a regular expression).
RUN_PANELS = (
    ("reward: the trained one (mean), and binary ones", r"reward/mean|reward/(.+/)?binary_mean"),
    ("held-out accuracy (eval grader), per subject", r"eval/accuracy(/.+)?"),
    ("audit: false-positive rate of the reward", r"audit/false_positive_rate"),
    ("KL to the reference (per token)", r"kl/k[13]"),
    ("entropy (per token)", r"entropy"),
    ("response length (tokens)", r"response/length_mean"),
)


def plot_run(path, rows: list[dict], title: str = "") -> str:
    """One picture of a run from its metrics.jsonl rows: a 2 x 3 grid (RUN_PANELS) of the reward, the
    held-out accuracy overall and per subject, the audit's false-positive rate, KL, entropy and response
    length against the step, as a 1200 x 700 PNG at `path`. A panel with nothing logged says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7), dpi=DPI)
    FigureCanvasAgg(fig)
    logged = list(dict.fromkeys(k for r in rows for k in r))
    for ax, (name, pattern) in zip(fig.subplots(2, 3).flat, RUN_PANELS):
        keys = [k for k in logged if re.fullmatch(pattern, k)]
        for key in keys:
            xs, ys = zip(*[(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))])
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        if keys:
            ax.legend(fontsize=6 if len(keys) > 4 else 8)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
