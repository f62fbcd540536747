"""A whole run as a user sees it: one command in a process of its own, timed from the moment it is
started to the moment it exits, with the file it should write checked, its peak RSS, its CPU time, and
how busy the machine was with other work meanwhile.

Peak RSS comes from `wait4`'s rusage for that one process. Linux carries a process's peak RSS across
fork + exec, so the caller must stay small (this module imports no torch).

Load from others = CPU busy time over the run (/proc/stat, every core) less the run's own CPU time,
divided by the wall time: how many cores other processes kept busy on average. `LOAD_LIMIT` is the
most we accept before a ratio is refused.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Other processes may keep at most this many cores busy on average during a side before the ratio
# of two sides is refused (half a core of the development machines' two).
LOAD_LIMIT = 0.5


@dataclass
class RunFigures:
    whole_run_s: float  # process start to exit (the output file checked to exist)
    file_written_s: float  # process start to the output file's last write
    peak_rss_gib: float
    cpu_s: float  # user + system of the run itself
    load_from_others: float  # cores busy with other processes, on average
    loadavg_mean: float  # the 1-minute load average sampled during the run (includes the run itself)
    returncode: int

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _busy_seconds() -> float:
    """Seconds of CPU busy (all cores, all processes) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal (guest counted in user)
    return busy / os.sysconf("SC_CLK_TCK")


class _LoadSampler(threading.Thread):
    def __init__(self, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self._done = every, [], threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append(os.getloadavg()[0])
            self._done.wait(self.every)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return sum(self.samples) / max(len(self.samples), 1)


def run_timed(command: list[str], *, output: Path, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, nice: int = 0) -> RunFigures:
    """Run `command` to its end (stdout and stderr into `log`) and measure it; `output` is the file
    it must write; `nice` adds to the caller's own niceness. Raises with the log's tail when it fails or
    writes nothing.

    Call it from a small process (the bench's parent never imports torch): Linux gives a child that the
    caller vforks and execs the caller's peak RSS as its own starting peak (seen: a 1.5 GiB caller made a
    300 MiB child read 1.48 GiB)."""
    sampler = _LoadSampler()
    sampler.start()
    busy0 = _busy_seconds()
    with open(log, "wb") as sink:
        started = time.time()
        process = subprocess.Popen(["nice", "-n", str(nice), *command], stdout=sink, stderr=subprocess.STDOUT,
                                   env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        ended = time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    loadavg = sampler.stop()
    wall = ended - started
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, (_busy_seconds() - busy0 - cpu) / wall)
    if process.returncode != 0 or not output.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{command[1] if len(command) > 1 else command[0]} failed "
                           f"(exit {process.returncode}, wrote {output.name}: {output.is_file()}):\n{tail}")
    return RunFigures(whole_run_s=wall, file_written_s=output.stat().st_mtime - started,
                      peak_rss_gib=usage.ru_maxrss / 2**20, cpu_s=cpu, load_from_others=others,
                      loadavg_mean=loadavg, returncode=process.returncode)


def ratio_line(ours: RunFigures, peer: RunFigures, what: str) -> str:
    """'<speed>x faster whole run at <memory>x the peak memory', or the refusal when the load was high."""
    worst = max(ours.load_from_others, peer.load_from_others)
    if worst > LOAD_LIMIT:
        return (f"load too high, not a ratio: other processes kept {worst:.2f} cores busy during a side "
                f"(limit {LOAD_LIMIT}); ours {ours.whole_run_s:.1f} s ({ours.cpu_s:.0f} s of CPU) "
                f"{ours.peak_rss_gib:.2f} GiB, {what} {peer.whole_run_s:.1f} s ({peer.cpu_s:.0f} s of CPU) "
                f"{peer.peak_rss_gib:.2f} GiB")
    return (f"ours vs {what}: {peer.whole_run_s / ours.whole_run_s:.2f}x faster whole run "
            f"({ours.whole_run_s:.1f} vs {peer.whole_run_s:.1f} s), {ours.peak_rss_gib / peer.peak_rss_gib:.2f}x "
            f"the peak memory ({ours.peak_rss_gib:.2f} vs {peer.peak_rss_gib:.2f} GiB); load from others "
            f"{ours.load_from_others:.2f} / {peer.load_from_others:.2f} cores")
