"""The whole-run benchmark's own measuring: a command's wall time, peak memory and the load from other
processes, and no ratio when that load was high (bench/whole_run.py, bench/reference_scripts.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import whole_run
from bench.reference_scripts import _source_commit
from bench.whole_run import RunFigures, ratio_line, run_timed

GROW = "import sys; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); " \
       "open(sys.argv[1], 'w').write('done')"


def test_a_timed_run_reports_its_own_peak_memory_and_checks_the_file_it_writes(tmp_path):
    # Measured from a small parent, as the bench runs it: Linux hands a parent's peak RSS to a child it
    # vforks and execs, so in this test process (torch loaded by other tests) the child would start at ours.
    measure = ("import dataclasses, json, sys; from pathlib import Path; from bench.whole_run import run_timed; "
               "out = Path(sys.argv[2]); figures = run_timed([sys.executable, '-c', sys.argv[1], str(out)], "
               "output=out, log=out.with_suffix('.log')); print(json.dumps(dataclasses.asdict(figures)))")
    done = subprocess.run([sys.executable, "-c", measure, GROW, str(tmp_path / "out.txt")], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    figures = RunFigures(**json.loads(done.stdout.strip().splitlines()[-1]))
    assert 0.29 < figures.peak_rss_gib < 1.0  # its own 300 MiB, not the caller's
    assert 0 < figures.file_written_s <= figures.whole_run_s + 0.01
    assert figures.load_from_others >= 0 and figures.returncode == 0


def test_a_run_that_writes_nothing_fails_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="wrote never.txt: False"):
        run_timed([sys.executable, "-c", "print('no file here')"], output=tmp_path / "never.txt",
                  log=tmp_path / "log.txt")


def _figures(seconds: float, gib: float, others: float) -> RunFigures:
    return RunFigures(whole_run_s=seconds, file_written_s=seconds, peak_rss_gib=gib, cpu_s=seconds,
                      load_from_others=others, loadavg_mean=1.0, returncode=0)


def test_the_ratio_is_printed_on_a_quiet_machine_and_refused_on_a_busy_one():
    quiet = ratio_line(_figures(100, 4.0, 0.1), _figures(200, 5.0, 0.2), "the example")
    assert "2.00x faster whole run" in quiet and "0.80x the peak memory" in quiet
    busy = ratio_line(_figures(100, 4.0, 0.1), _figures(200, 5.0, whole_run.LOAD_LIMIT + 0.1), "the example")
    assert busy.startswith("load too high, not a ratio") and "200.0 s" in busy and "x faster" not in busy


def test_the_lock_file_names_the_commit_the_examples_are_read_at():
    assert len(_source_commit("diffusers")) == 40
