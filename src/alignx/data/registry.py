"""Where every source data set lives: its file, its online copies and its row parser.

Each :class:`Source` names

- its file(s) relative to the data directory, laid out exactly like ``shared/data`` (the directory
  comes from ``data.data_dir`` or ``$ALIGNX_DATA_DIR``);
- how to get the same rows online: a Hugging Face hub data set (``hub``) and/or a raw file URL
  pinned to the upstream commit the local copy was taken from (``url``; parsed by the very same
  reader as the local file, so the rows are identical). Sources with neither are local-only;
- a row parser that turns one raw record into a dict with normalised field names, or rejects it
  with a reason.

Reading and parsing the rows is :mod:`alignx.data.loading` and :mod:`alignx.data.parsers`.

Online choices (documented here because the hub copies differ from the local ones):

- ``tatsu-lab/alpaca_eval`` is a loading-script data set that ``datasets>=4`` cannot run, so the
  pinned GitHub file of the AlpacaEval repo is the fallback (``url``).
- TruthfulQA on the hub (``truthfulqa/truthful_qa``, config ``generation``) names its columns
  ``question, best_answer, correct_answers (list), incorrect_answers (list), type, category,
  source``; :func:`alignx.data.parsers.truthfulqa_hub` maps them to the same normalised fields as the CSV.
- XSTest: ``walledai/XSTest`` (split ``test``; columns prompt, focus, type, note, label; the
  450 prompts of xstest_prompts.csv). It was chosen over ``natolambert/xstest-v2-copy`` because it
  holds exactly the prompt file, with the same ``label`` column; rows without an ``id`` get
  ``position + 1``, which is the CSV's numbering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignx.data.parsers import (
    Parser,
    alpaca_eval,
    alpaca_eval_annotation,
    beavertails,
    hh_rlhf,
    instruction_row,
    leaderboard_row,
    pku_saferlhf,
    stl_eval,
    truthfulqa,
    truthfulqa_finetune,
    truthfulqa_hub,
    truthfulqa_mc,
    xstest,
    xstest_completion,
)
from alignx.errors import AlignXError

SETTING = "data.data_dir / $ALIGNX_DATA_DIR"


@dataclass(frozen=True)
class HubSpec:
    """Arguments for ``datasets.load_dataset(path, name, data_dir=..., split=...)``."""

    path: str
    name: str | None = None
    split: str = "train"
    data_dir: str | None = None

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("config", self.name), ("data_dir", self.data_dir)) if v)
        return f"{self.path}{extra} split={self.split}"


@dataclass(frozen=True)
class Source:
    """One source data set: local file, online location(s), file format and row parser."""

    name: str
    path: str  # relative to the data directory (layout of shared/data)
    fmt: str  # jsonl | jsonl.gz | json_list | json_columns | csv
    parse: Parser
    hub: HubSpec | None = None
    hub_parse: Parser | None = None  # parser for hub rows when their columns differ from the file's
    url: str | None = None  # the same file online, pinned to the commit the local copy came from
    description: str = ""
    columns_key: str = field(default="instructions")  # json_columns: the list that defines the rows


# --------------------------------------------------------------------------------------------
# the registry

_STL_COMMIT = "https://raw.githubusercontent.com/vinid/safety-tuned-llamas/36a4b8d5c2177ed165bf61f59b590161394f7f12"
_TQA_COMMIT = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/d71c110897f5d31c5d7f309e7bc316c152f6f031"
_XST_COMMIT = "https://raw.githubusercontent.com/paul-rottger/exaggerated-safety/d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d"
_AE_COMMIT = "https://raw.githubusercontent.com/tatsu-lab/alpaca_eval/cd543a149df89434d8a54582c0151c0b945c3d20"

# The safety-tuned-llamas evaluation sets (dict-of-lists files).
STL_EVAL_SETS: tuple[str, ...] = (
    "I-Alpaca",
    "I-CoNa",
    "I-Controversial",
    "I-MaliciousInstructions",
    "I-PhysicalSafetySafe",
    "I-PhysicalSafetyUnsafe",
    "Q-Harm",
)
XSTEST_COMPLETION_MODELS: tuple[str, ...] = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
ALPACA_EVAL_ANNOTATIONS: tuple[tuple[str, str], ...] = (
    ("alpaca_eval_gpt4", "alpaca-7b"),
    ("alpaca_eval_gpt4", "llama-2-7b-chat-hf"),
    ("alpaca_eval_gpt4", "zephyr-7b-beta"),
    ("weighted_alpaca_eval_gpt4_turbo", "alpaca-7b"),
    ("weighted_alpaca_eval_gpt4_turbo", "text_davinci_003"),
)
ALPACA_EVAL_SYSTEM_OUTPUTS: tuple[str, ...] = ("alpaca-7b", "llama-2-7b-chat-hf", "zephyr-7b-beta")  # model_outputs/


def _build_registry() -> dict[str, Source]:
    sources = [
        Source(
            "alpaca",
            "alpaca/alpaca_data.jsonl",
            "jsonl",
            instruction_row,
            hub=HubSpec("tatsu-lab/alpaca", split="train"),
            description="Stanford Alpaca, 52,002 instructions (helpful training)",
        ),
        Source(
            "alpaca_eval",
            "alpaca_eval/reference_outputs/text_davinci_003_model_outputs.json",
            "json_list",
            alpaca_eval,
            hub=HubSpec("tatsu-lab/alpaca_eval", name="alpaca_eval", split="eval"),
            url=f"{_AE_COMMIT}/results/text_davinci_003/model_outputs.json",
            description="AlpacaEval 805 instructions + text-davinci-003 references (helpful evaluation)",
        ),
        Source(
            "beavertails",
            "beavertails/30k_test.jsonl",
            "jsonl",
            beavertails,
            hub=HubSpec("PKU-Alignment/BeaverTails", split="30k_test"),
            description="BeaverTails 30k_test, 3,021 labelled QA pairs (harmless dev/eval halves)",
        ),
        Source(
            "hh_rlhf_harmless",
            "hh-rlhf/harmless-base/test.jsonl.gz",
            "jsonl.gz",
            hh_rlhf,
            hub=HubSpec("Anthropic/hh-rlhf", data_dir="harmless-base", split="test"),
            description="Anthropic HH-RLHF harmless-base test, 2,312 chosen/rejected dialogues",
        ),
        Source(
            "safety_tuned_llamas",
            "safety_tuned_llamas/training/safety_only_data_Instructions.json",
            "json_list",
            instruction_row,
            url=f"{_STL_COMMIT}/data/training/safety_only_data_Instructions.json",
            description="Safety-tuned LLaMAs, 2,483 safety demonstrations (harmless training)",
        ),
        Source(
            "truthfulqa",
            "truthfulqa/TruthfulQA.csv",
            "csv",
            truthfulqa,
            hub=HubSpec("truthfulqa/truthful_qa", name="generation", split="validation"),
            hub_parse=truthfulqa_hub,
            description="TruthfulQA, 817 questions with best/correct/incorrect answers",
        ),
        Source(
            "truthfulqa_mc",
            "truthfulqa/mc_task.json",
            "json_list",
            truthfulqa_mc,
            hub=HubSpec("truthfulqa/truthful_qa", name="multiple_choice", split="validation"),
            description="TruthfulQA MC1/MC2 targets (answer -> 1/0)",
        ),
        Source(
            "truthfulqa_finetune_truth",
            "truthfulqa/finetune_truth.jsonl",
            "jsonl",
            truthfulqa_finetune("True"),
            url=f"{_TQA_COMMIT}/data/finetune_truth.jsonl",
            description="TruthfulQA GPT-judge data: human truthfulness labels",
        ),
        Source(
            "truthfulqa_finetune_info",
            "truthfulqa/finetune_info.jsonl",
            "jsonl",
            truthfulqa_finetune("Helpful"),
            url=f"{_TQA_COMMIT}/data/finetune_info.jsonl",
            description="TruthfulQA GPT-info data: human informativeness labels",
        ),
        Source(
            "xstest",
            "xstest/xstest_prompts.csv",
            "csv",
            xstest,
            hub=HubSpec("walledai/XSTest", split="test"),
            url=f"{_XST_COMMIT}/xstest_prompts.csv",
            description="XSTest 450 prompts: 250 safe, 200 unsafe contrast prompts (over-refusal)",
        ),
        Source(
            "pku_saferlhf",
            "pku_saferlhf/guardreasoner_saferlhf_test_2k.jsonl",
            "jsonl",
            pku_saferlhf,
            description="PKU-SafeRLHF 2k response-harmfulness pairs (judge validation; local only)",
        ),
    ]
    for set_name in STL_EVAL_SETS:
        sources.append(
            Source(
                f"stl_eval:{set_name}",
                f"safety_tuned_llamas/evaluation/{set_name}.json",
                "json_columns",
                stl_eval,
                url=f"{_STL_COMMIT}/data/evaluation/{set_name}.json",
                description=f"Safety-tuned LLaMAs evaluation set {set_name}",
            )
        )
    for model in XSTEST_COMPLETION_MODELS:
        sources.append(
            Source(
                f"xstest_completions:{model}",
                f"xstest/model_completions/xstest_v2_completions_{model}.csv",
                "csv",
                xstest_completion,
                url=f"{_XST_COMMIT}/model_completions/xstest_v2_completions_{model}.csv",
                description=f"XSTest completions of {model} with human compliance/refusal labels",
            )
        )
    for annotator, model in ALPACA_EVAL_ANNOTATIONS:
        sources.append(
            Source(
                f"alpaca_eval_annotations:{annotator}:{model}",
                f"alpaca_eval/annotations/{annotator}/{model}.json",
                "json_list",
                alpaca_eval_annotation,
                url=f"{_AE_COMMIT}/results/{model}/{annotator}/annotations.json",
                description=f"AlpacaEval {annotator} pairwise verdicts for {model}",
            )
        )
    for model in ALPACA_EVAL_SYSTEM_OUTPUTS:
        sources.append(
            Source(
                f"alpaca_eval_outputs:{model}",
                f"alpaca_eval/model_outputs/{model}.json",
                "json_list",
                alpaca_eval,
                url=f"{_AE_COMMIT}/results/{model}/model_outputs.json",
                description=f"AlpacaEval answers of {model} (the texts its leaderboard rows judged)",
            )
        )
    sources.append(
        Source(
            "alpaca_eval_reference:gpt4_1106_preview",
            "alpaca_eval/reference_outputs/gpt4_1106_preview_model_outputs.json",
            "json_list",
            alpaca_eval,
            url=f"{_AE_COMMIT}/results/gpt4_1106_preview/model_outputs.json",
            description="AlpacaEval 2's reference answers (GPT-4-Turbo, gpt4_1106_preview)",
        )
    )
    sources.append(
        Source(
            "alpaca_eval_leaderboard:weighted_alpaca_eval_gpt4_turbo",
            "alpaca_eval/leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv",
            "csv",
            leaderboard_row,
            url=f"{_AE_COMMIT}/src/alpaca_eval/leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv",
            description="AlpacaEval 2 leaderboard: GPT-4-Turbo's win rate of each system against its own answers",
        )
    )
    sources.append(
        Source(
            "alpaca_eval_leaderboard:alpaca_eval_gpt4",
            "alpaca_eval/leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv",
            "csv",
            leaderboard_row,
            url=f"{_AE_COMMIT}/src/alpaca_eval/leaderboards/data_AlpacaEval/alpaca_eval_gpt4_leaderboard.csv",
            description="AlpacaEval 1 leaderboard: GPT-4's win rate of each system against text-davinci-003",
        )
    )
    return {s.name: s for s in sources}


SOURCES: dict[str, Source] = _build_registry()


def source_names() -> list[str]:
    return list(SOURCES)


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise AlignXError(f"unknown data source {name!r}; valid sources: {', '.join(SOURCES)}") from None
