"""`alignx eval` on a tiny run: every benchmark scored, report written, and nothing finished is redone."""

import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from alignx.axes import AXES
from alignx.eval.benchmarks import BENCHMARKS, HEADLINE
from alignx.eval.judges import Judge
from alignx.generate import AlignX
from alignx.eval.runner import _routing, axis_collapse, current_rows, eval_paths, plan, read_jsonl, run_eval
from alignx.run import RunDir


class LengthJudge(Judge):
    """A deterministic stand-in for a trained judge: P grows with the response length; counts its calls."""

    identity = ""  # a plain attribute here, so a test can name another judge behind the same spec

    def __init__(self, task):
        self.task, self.spec, self.calls = task, f"test-length-{task}", 0
        self.identity = self.spec

    def score(self, items):
        self.calls += len(items)
        return np.array([min(1.0, len(item.response) / 40) for item in items])

    def describe(self):  # validated rates: sensitivity 0.8, specificity 0.7
        return {**super().describe(), "confusion": {"tp": 40, "fn": 10, "tn": 35, "fp": 15}}


@pytest.fixture(scope="module")
def eval_config(tiny_stage2_run):
    from alignx.config import load_config

    return load_config(None, [
        *(f"{k}={v}" for k, v in {"run_dir": tiny_stage2_run.run_dir, "model.name": tiny_stage2_run.model.name,
                                  "model.precision": "fp32", "data.data_dir": tiny_stage2_run.data.data_dir}.items()),
        "data.max_rows_per_axis=48", "features.max_length=64", "stage2.latent_dim=16", "stage2.router_hidden=64",
        "eval.quick_items=3", "eval.max_new_tokens=3", "eval.batch_size=2", "eval.bootstrap=50",
    ])


def generating_methods(monkeypatch) -> list[str]:
    """The method of every AlignX.generate call from now on (the calls still run)."""
    methods = []
    original = AlignX.generate

    def spy(self, prompts, **kwargs):
        methods.append(self.method)
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(AlignX, "generate", spy)
    return methods


def judges():
    return {task: LengthJudge(task) for task in ("safety", "truth", "info", "helpfulness", "refusal")}


def test_peft_arrow_is_evaluated_like_any_method(eval_config):
    import dataclasses

    config = dataclasses.replace(eval_config, eval=dataclasses.replace(eval_config.eval, axis_collapse=False))
    results = run_eval(RunDir(config.run_dir), config, ["arrow"], judges=judges(), log=lambda *_: None)
    arrow = results["methods"]["arrow"]
    assert set(arrow["benchmarks"]) == {"alpacaeval", "beavertails", "harmful", "xstest_safe", "truthfulqa", "truthfulqa_mc"}
    assert "routing" not in arrow  # Arrow mixes per token: there is no per-prompt weight vector to score


def test_oracle_answers_with_each_benchmarks_gold_expert(eval_config, monkeypatch):
    run = RunDir(eval_config.run_dir)
    results = run_eval(run, eval_config, ["oracle"], judges=judges(), log=lambda *_: None)
    paths = eval_paths(run, "quick")
    for benchmark, axis in (("alpacaeval", "helpful"), ("beavertails", "harmless"), ("truthfulqa", "honest")):
        oracle = read_jsonl(paths.generations("oracle", benchmark))
        assert all(row["weights"] == {a: float(a == axis) for a in AXES} for row in oracle)
        if benchmark in ("alpacaeval", "truthfulqa"):  # the experts' own runs (Axis Collapse) answer the same
            expert = {r["id"]: r["response"] for r in read_jsonl(paths.generations(f"expert-{axis}", benchmark))}
            assert {r["id"]: r["response"] for r in oracle} == expert
    safe = read_jsonl(paths.generations("oracle", "xstest_safe"))
    assert all(row["weights"]["helpful"] == 1.0 for row in safe)  # a benign request: the helpful expert
    assert "routing" not in results["methods"]["oracle"]  # nothing was routed
    # beside the experts, the oracle copies their answers (the same computation) instead of generating again
    for path in (paths.generations("oracle", "beavertails"), paths.mc("oracle")):
        path.unlink()
    generated = generating_methods(monkeypatch)
    again = run_eval(run, eval_config, ["expert-harmless", "expert-honest", "oracle"], judges=judges(), log=lambda *_: None)
    assert "expert-honest" in generated and "oracle" not in generated  # copied, nothing generated for it
    expert = {r["id"]: r["response"] for r in read_jsonl(paths.generations("expert-harmless", "beavertails"))}
    oracle = read_jsonl(paths.generations("oracle", "beavertails"))
    assert {r["id"]: r["response"] for r in oracle} == expert and {r["method"] for r in oracle} == {"oracle"}
    assert again["methods"]["oracle"]["benchmarks"]["truthfulqa_mc"] == again["methods"]["expert-honest"]["benchmarks"]["truthfulqa_mc"]


def test_generation_batches_keep_to_the_token_budget(eval_config, monkeypatch):
    import dataclasses

    run, paths = RunDir(eval_config.run_dir), eval_paths(RunDir(eval_config.run_dir), "quick")
    sizes = []
    original = AlignX.generate

    def spy(self, prompts, **kwargs):
        sizes.append(len(prompts))
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(AlignX, "generate", spy)
    generating = [name for name, spec in BENCHMARKS.items() if spec.generates]
    for budget, expected in ((10**6, {2, 1}), (1, {1})):  # 3 items in batches of 2; a budget below any prompt: alone
        for benchmark in generating:
            paths.generations("base", benchmark).unlink(missing_ok=True)
        sizes.clear()
        evaluation = dataclasses.replace(eval_config.eval, batch_tokens=budget, axis_collapse=False)
        run_eval(run, dataclasses.replace(eval_config, eval=evaluation), ["base"], judges=judges(), log=lambda *_: None)
        assert set(sizes) == expected and sum(sizes) == 3 * len(generating)
        assert all(len(read_jsonl(paths.generations("base", benchmark))) == 3 for benchmark in generating)


def test_item_counts_per_benchmark(eval_config):
    import dataclasses

    from alignx.errors import AlignXError
    from alignx.eval.benchmarks import benchmark_items

    evaluation = dataclasses.replace(eval_config.eval, items={"truthfulqa_mc": 5})
    assert len(benchmark_items("truthfulqa_mc", eval_config.data, evaluation)) == 5
    assert len(benchmark_items("truthfulqa", eval_config.data, evaluation)) == 3
    config = dataclasses.replace(eval_config, eval=dataclasses.replace(eval_config.eval, benchmarks=["beavertail"]))
    with pytest.raises(AlignXError, match="eval.benchmarks: unknown benchmark 'beavertail'"):
        run_eval(RunDir(config.run_dir), config, ["base"], judges=judges(), log=lambda *_: None)
    config = dataclasses.replace(eval_config, eval=dataclasses.replace(eval_config.eval, items={"truthfulqa-mc": 5}))
    with pytest.raises(AlignXError, match="unknown benchmark 'truthfulqa-mc'"):
        run_eval(RunDir(config.run_dir), config, ["base"], judges=judges(), log=lambda *_: None)


def test_plan_adds_each_expert_on_its_own_axis():
    todo = plan(["alignx", "base"], axis_collapse=True)
    assert todo["expert-helpful"] == ["alpacaeval"] and todo["expert-honest"] == ["truthfulqa"]
    assert "truthfulqa_mc" in todo["alignx"] and "expert-harmless" in todo
    assert set(plan(["base"], axis_collapse=False)) == {"base"}
    chosen = plan(["alignx"], axis_collapse=True, benchmarks=["truthfulqa", "alpacaeval"])  # eval.benchmarks
    assert chosen["alignx"] == ["alpacaeval", "truthfulqa"] and "expert-harmless" not in chosen


def test_eval_scores_every_benchmark_and_resumes_without_redoing(eval_config, monkeypatch):
    run = RunDir(eval_config.run_dir)
    results = run_eval(run, eval_config, ["alignx", "base"], judges=judges(), log=lambda *_: None)
    paths = eval_paths(run, "quick")
    alignx = results["methods"]["alignx"]
    assert set(alignx["benchmarks"]) == {"alpacaeval", "beavertails", "harmful", "xstest_safe", "truthfulqa", "truthfulqa_mc"}
    for benchmark in alignx["benchmarks"].values():
        for metric in benchmark.values():
            if "ci" in metric:
                assert 0.0 <= metric["ci"][0] <= metric["value"] <= metric["ci"][1] <= 1.0
    # alpacaeval, beavertails, harmful, truthfulqa have a gold axis: each row is routed or sent to the fallback
    assert alignx["routing"]["n"] + alignx["routing"]["fallback"]["n"] == 3 * 4
    assert "routing" not in results["methods"]["base"]
    assert set(results["methods"]["expert-honest"]["axis_scores"]) == {"honest"}  # evaluated on its own axis only
    for name in ("results.json", "report.md", "report.html", "hhh_scores.png", "win_rates.png"):
        assert (paths.root / name).is_file(), name
    # every rate a binary judge produced also comes corrected for that judge's error (Rogan-Gladen)
    unsafe = alignx["benchmarks"]["beavertails"]["unsafe_rate"]
    expected = (unsafe["value"] + 0.7 - 1) / (0.8 + 0.7 - 1)  # unclipped: below 0 when raw < the 0.3 false-positive rate
    assert unsafe["corrected"]["value"] == pytest.approx(expected)
    assert alignx["benchmarks"]["beavertails"]["safe_rate"]["corrected"]["value"] == pytest.approx(1 - expected)
    for benchmark, key in (("alpacaeval", "win_rate"), ("harmful", "refusal_rate"), ("beavertails", "unsafe_rate")):
        corrected = alignx["benchmarks"][benchmark][key]["corrected"]
        raw = alignx["benchmarks"][benchmark][key]["value"]
        assert corrected["value"] == pytest.approx((raw - 0.3) / 0.5)
        assert corrected["rejected"] == (not 0.3 <= raw <= 0.8)  # the error model cannot produce that raw rate
    helpful = alignx["benchmarks"]["alpacaeval"]
    assert "corrected" not in helpful["equal_length_win_rate"]  # the judge was validated on whole pairs only
    # the headline judged the pair cut to the same length; the win rate the answer against the whole reference
    scored = read_jsonl(paths.scored("alignx", "alpacaeval"))
    generated = {r["id"]: r for r in current_rows(paths.generations("alignx", "alpacaeval"), results["keys"]["alignx"])}
    for row in scored:
        pair = generated[row["id"]]["equal_length"]
        assert row["scores"]["helpfulness@equal_length"]["p"] == pytest.approx(min(1.0, len(pair["response"]) / 40))
        assert row["scores"]["helpfulness"]["p"] == pytest.approx(min(1.0, len(row["response"]) / 40))
    # eval.max_new_tokens=3: every answer of the tiny random model runs to the cap
    assert all(e["at_cap"]["value"] == 1.0 for e in alignx["benchmarks"].values() if "at_cap" in e)
    assert "## Answers cut at the token cap" in (paths.root / "report.md").read_text()
    report = (paths.root / "report.md").read_text()
    assert "## Rates corrected for judge error" in report and "- safety: **corrected**, unchecked" in report
    # every method against the reference (alignx), paired on the same items, and the HHH mean
    paired = results["paired"]
    assert paired["reference"] == "alignx" and set(paired["methods"]) == {"base", *(f"expert-{a}" for a in AXES)}
    base = results["methods"]["base"]
    difference = paired["methods"]["base"]["beavertails"]["unsafe_rate"]
    assert difference["value"] == pytest.approx(base["benchmarks"]["beavertails"]["unsafe_rate"]["value"] - unsafe["value"])
    assert difference["ci"][0] <= difference["value"] <= difference["ci"][1]
    assert difference["corrected"]["value"] == pytest.approx(difference["value"] / 0.5)  # Δraw / Youden's J
    hhh = np.mean([alignx["benchmarks"][b][k]["value"] for b, k in HEADLINE.values()])
    assert alignx["hhh_mean"]["value"] == pytest.approx(hhh) and "hhh_mean" not in results["methods"]["expert-honest"]
    assert paired["methods"]["base"]["hhh_mean"]["value"] == pytest.approx(base["hhh_mean"]["value"] - hhh)
    assert set(paired["methods"]["expert-honest"]) == {"truthfulqa"}  # only what both answered
    assert "## Paired differences to alignx" in report and "HHH mean" in report
    # the answers in the official tools' formats: AlpacaEval's model_outputs.json, TruthfulQA's CSV
    outputs = json.loads((paths.root / "exports" / "alpaca_eval" / "alignx.json").read_text())
    rows = {r["prompt"]: r["response"] for r in read_jsonl(paths.generations("alignx", "alpacaeval"))}
    assert len(outputs) == 3 and all(set(o) == {"instruction", "output", "generator", "dataset"} for o in outputs)
    assert all(o["output"] == rows[o["instruction"]] and o["generator"] == "alignx-alignx" for o in outputs)
    assert all(o["dataset"] in {"helpful_base", "koala", "oasst", "selfinstruct", "vicuna"} for o in outputs)
    with open(paths.root / "exports" / "truthfulqa" / "answers.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    answers = {r["prompt"]: r["response"] for r in read_jsonl(paths.generations("base", "truthfulqa"))}
    assert len(table) == 3 and all(r["base"] == answers[r["Question"]] and r["Best Answer"] and r["Category"] for r in table)
    assert "expert-honest" in table[0] and "alignx" in table[0]
    assert json.loads(paths.results.read_text())["methods"]["base"]["axis_scores"] == results["methods"]["base"]["axis_scores"]

    # an interruption mid-file: one finished row and a torn line remain
    generations = paths.generations("base", "alpacaeval")
    lines = [json.dumps(row) for row in current_rows(generations, results["keys"]["base"])]
    generations.write_text(lines[0] + "\n" + lines[1][:10])
    from alignx.generate import AlignX

    generated = []
    original = AlignX.generate

    def spy(self, prompts, **kwargs):
        generated.extend(prompts)
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(AlignX, "generate", spy)
    again_judges = judges()
    again = run_eval(run, eval_config, ["alignx", "base"], judges=again_judges, log=lambda *_: None)
    assert len(generated) == 2  # only the two lost alpacaeval items of base
    assert len(read_jsonl(generations)) == 3
    assert all(j.calls == 0 for j in again_judges.values())  # greedy: same responses, cached scores reused
    assert again["methods"]["alignx"] == results["methods"]["alignx"]

    # a changed response (or judge) is judged again; only that one
    rows = read_jsonl(generations)
    rows[0]["response"] = "a different and much longer answer than before"
    generations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    third = judges()
    run_eval(run, eval_config, ["alignx", "base"], judges=third, log=lambda *_: None)
    assert third["helpfulness"].calls == 2 and third["safety"].calls == 0  # the answer whole and its equal-length pair

    # the same spec naming another judge (a retrained offline judge): its scores are not the old judge's
    retrained = judges()
    retrained["safety"].identity = "test-length-safety@retrained"
    run_eval(run, eval_config, ["alignx", "base"], judges=retrained, log=lambda *_: None)
    assert retrained["safety"].calls > 0 and retrained["truth"].calls == 0


def test_a_refitted_router_is_evaluated_anew_and_the_others_are_reused(eval_config, tmp_path, monkeypatch):
    import dataclasses

    shutil.copytree(eval_config.run_dir, tmp_path / "run")
    config = dataclasses.replace(eval_config, run_dir=str(tmp_path / "run"),
                                 eval=dataclasses.replace(eval_config.eval, axis_collapse=False))
    run = RunDir(config.run_dir)
    first = run_eval(run, config, ["alignx", "base"], judges=judges(), log=lambda *_: None)
    router = run.root / "stage2" / "alignx" / "mocae.json"
    router.write_text(router.read_text() + "\n")  # Stage 2 fitted again: another file, whatever its weights
    generated = generating_methods(monkeypatch)
    again = run_eval(run, config, ["alignx", "base"], judges=judges(), log=lambda *_: None)
    assert set(generated) == {"alignx"}  # base depends on nothing that changed
    assert again["keys"]["alignx"] != first["keys"]["alignx"] and again["keys"]["base"] == first["keys"]["base"]
    paths = eval_paths(run, "quick")
    assert len(read_jsonl(paths.generations("alignx", "alpacaeval"))) == 6  # the old rows stay, under their old key
    assert len(read_jsonl(paths.mc("alignx"))) == 6


def test_unknown_method_is_a_clear_error(eval_config):
    from alignx.errors import AlignXError

    with pytest.raises(AlignXError, match="unknown method"):
        run_eval(RunDir(eval_config.run_dir), eval_config, ["no-such-method"], judges=judges(), log=lambda *_: None)


def test_axis_collapse_divides_by_the_axis_own_expert():
    methods = {
        "alignx": {"axis_scores": {"helpful": 0.2, "harmless": 0.9, "honest": 0.3}, "routing": {"misrouting": {"helpful": 0.4}}},
        "expert-helpful": {"axis_scores": {"helpful": 0.4}},
        "expert-harmless": {"axis_scores": {"harmless": 0.6}},
        "expert-honest": {"axis_scores": {"honest": 0.0}},  # nothing to divide by
    }
    table = axis_collapse(methods)
    assert table["alignx"]["relative"] == pytest.approx({"helpful": 0.5, "harmless": 1.5, "honest": None})
    assert table["alignx"]["misrouting"] == {"helpful": 0.4}
    assert table["expert-helpful"]["relative"] == {"helpful": 1.0, "harmless": None, "honest": None}


def test_fallback_rows_are_counted_apart_not_as_the_first_axis():
    def w(helpful, harmless, honest):
        return {"helpful": helpful, "harmless": harmless, "honest": honest}

    routed = [
        (w(0.8, 0.1, 0.1), "helpful", False),
        (w(0.1, 0.7, 0.2), "harmless", False),
        (w(0.0, 0.0, 0.0), "harmless", True),  # the base model: predicts no axis (argmax would say helpful)
        (w(1 / 3, 1 / 3, 1 / 3), "honest", True),  # uniform: no axis either
        (w(0.6, 0.1, 0.3), "honest", False),  # a real miss
    ]
    metrics = _routing(routed)
    assert metrics["n"] == 3 and metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["misrouting"] == pytest.approx({"helpful": 0.0, "harmless": 0.0, "honest": 1.0})
    assert metrics["fallback"]["n"] == 2 and metrics["fallback"]["rate"] == pytest.approx(0.4)
    assert metrics["fallback"]["by_axis"] == pytest.approx({"helpful": 0.0, "harmless": 0.5, "honest": 0.5})
    assert _routing(routed[2:4]) == {"fallback": {"n": 2, "rate": 1.0, "by_axis": {"harmless": 1.0, "honest": 1.0}}, "n": 0}


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered(page, tmp_path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium (no network: the report is self-contained)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([CHROMIUM, *flags, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1400,2000", page],
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "shot.png").stat().st_size > 10_000  # a rendered page, not a blank one
    return subprocess.run([CHROMIUM, *flags, "--dump-dom", page], check=True, capture_output=True, text=True,
                          timeout=120).stdout


# skipped only off CI: on CI (`CI` set, as .ci/run sets it) a missing browser fails the test instead
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="headless Chromium is not installed (Debian package chromium)")
def test_report_html_renders_answers_side_by_side_in_a_real_browser(eval_config, tmp_path):
    assert CHROMIUM, "CI is set but headless Chromium is not installed: apt-get install -y chromium (.ci/run does)"
    run = RunDir(eval_config.run_dir)
    run_eval(run, eval_config, ["alignx", "base"], judges=judges(), log=lambda *_: None)
    report = eval_paths(run, "quick").root / "report.html"
    isolated = tmp_path / "report.html"  # alone in a folder: nothing it shows may come from a file beside it
    shutil.copy(report, isolated)
    dom = _rendered(isolated.as_uri(), tmp_path)
    assert "<h2>Paired differences to alignx" in dom and dom.count("<img") >= 3
    assert dom.count("src=\"data:image/png;base64,") == dom.count("<img")
    assert dom.count('<tr class="item">') == 3  # the first benchmark's three prompts, rendered by the page's script
    assert "<th>alignx</th><th>base</th>" in dom and "helpful " in dom  # a column per method, routing weights
    assert 'class="verdict"' in dom and "3 of 3 prompts" in dom
    # the filters, preset through the link: only the prompts where alignx's answer was judged unsafe
    rows = read_jsonl(eval_paths(run, "quick").scored("alignx", "beavertails"))
    unsafe = sum(row["scores"]["safety"]["p"] >= 0.5 for row in rows)
    dom = _rendered(isolated.as_uri() + "#benchmark=beavertails&of=alignx&verdict=safety:%20unsafe", tmp_path)
    assert dom.count('<tr class="item">') == unsafe and f"{unsafe} of 3 prompts" in dom
