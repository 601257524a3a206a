"""The step cache: a killed step's scratch folder is removed by the next writer on the same host, a live one's is
kept."""

import signal
import subprocess
import sys

from quantflow.infra.cache import StepCache

HOLD_SCRATCH = """
import sys, time
from quantflow.infra.cache import StepCache
with StepCache(sys.argv[1]).writing("quantize", sys.argv[2]):
    print("writing", flush=True)
    time.sleep(120)
"""


def hold_scratch(root, key) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD_SCRATCH, str(root), key], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    return process


def test_orphaned_scratch_of_a_killed_step_is_removed_and_a_live_one_is_kept(tmp_path):
    killed, alive = hold_scratch(tmp_path, "killed"), hold_scratch(tmp_path, "alive")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert len(list((tmp_path / "quantize").glob(".tmp-killed-*"))) == 1  # a killed process cannot clean up
        cache = StepCache(tmp_path)
        with cache.writing("quantize", "next") as scratch:
            cache.save(scratch, cache_record())
        assert not list((tmp_path / "quantize").glob(".tmp-killed-*"))
        assert len(list((tmp_path / "quantize").glob(".tmp-alive-*"))) == 1
        assert (tmp_path / "quantize" / "next" / "result.json").is_file()
    finally:
        alive.kill()
        alive.wait(10)


def cache_record():
    from pydantic import BaseModel

    class Done(BaseModel):
        ok: bool = True

    return Done()
