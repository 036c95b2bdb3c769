"""benchmarks/axis_loss.py end to end on a tiny run: its tables and its last line."""

import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "axis_loss.py"


def test_the_script_prints_content_token_losses_and_ends_with_its_key_figures(tiny_stage2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_stage2_run.run_dir, run)
    done = subprocess.run([sys.executable, str(SCRIPT), "--run", str(run), "--items", "3", "--batch-size", "2",
                           "--methods", "alignx,oracle,best-expert,base"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "content tokens" in done.stdout and "end-of-turn NLL per answer" in done.stdout
    figures = dict(part.split("=") for part in lines[-1].split())
    assert set(figures) == {"alignx", "oracle", "base", "best_expert"}  # no sft-mix in this run
    assert all(float(v) > 0 for v in figures.values())
    assert any(line.startswith("best-expert (expert-") for line in lines)
