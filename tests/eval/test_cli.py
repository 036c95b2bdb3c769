"""`alignx eval`'s command line: what a run's own config.yaml may decide when it is evaluated."""

from conftest import shared_run

from alignx.cli import main
from alignx.errors import AlignXError
from alignx.eval import runner
from alignx.generate import AlignX


def test_eval_runs_a_runs_model_code_only_with_the_users_flag(tiny_stage2_run, tmp_path, monkeypatch, capsys):
    """A run asking to run its model's code is refused in one line before any work, until --trust-remote-code,
    which reaches every load of the run (a user's own run on a model with code of its own could not be evaluated
    at all). The tiny Llama has no code of its own: nothing remote loads here."""
    asking = shared_run(tiny_stage2_run.run_dir, tmp_path / "asking", trust_remote_code=True)
    assert main(["eval", "--run", str(asking), "--methods", "base"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"alignx: error: {asking} asks to run the code of its base model")
    assert "--trust-remote-code" in error and not (asking / "eval").exists()

    loads = []

    def from_run(cls, run_dir, **kwargs):  # what `alignx eval` would load
        loads.append(kwargs)
        raise AlignXError("stopped at the base model")

    monkeypatch.setattr(AlignX, "from_run", classmethod(from_run))
    monkeypatch.setattr(runner, "load_eval_judges", lambda config, todo: {})
    assert main(["eval", "--run", str(asking), "--methods", "base", "--trust-remote-code", "eval.quick_items=2"]) == 2
    assert loads == [{"method": "base", "trust_remote_code": True}]
