"""data_prep leaning on its libraries: tiktoken's model -> encoding map, .tsv by extension,
matplotlib's object API (no backend switch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.__main__ import main
from tunekit.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- tiktoken's model -> encoding map


@pytest.mark.parametrize("model", ["gpt-4o-mini-2024-07-18", "gpt-4.1-nano-2025-04-14",
                                   "ft:gpt-4o-mini-2024-07-18:org::id", "gpt-3.5-turbo-0125"])
def test_encoding_is_tiktokens_choice(model):
    from tiktoken.model import encoding_name_for_model

    from data_prep.tokens import encoding_name

    assert encoding_name(model) == encoding_name_for_model(model)
    assert encoding_name(model) == ("cl100k_base" if model.startswith("gpt-3.5") else "o200k_base")


def test_fine_tuned_gpt_4_1_uses_its_base_models_encoding():
    from data_prep.tokens import encoding_name

    # tiktoken's own "ft:gpt-4" prefix would say cl100k_base here
    assert encoding_name("ft:gpt-4.1-nano-2025-04-14:org::id") == "o200k_base"
    assert encoding_name("ft:gpt-3.5-turbo-0125:org::id") == "cl100k_base"


def test_o200k_models_get_the_offline_encoding():
    from data_prep.tokens import encoding_for_model

    for model in ("gpt-4.1-nano-2025-04-14", "ft:gpt-4o-mini-2024-07-18:org::id"):
        enc = encoding_for_model(model)
        assert enc.name == "o200k_base" and enc.decode(enc.encode("héllo")) == "héllo"


def test_unknown_model_is_a_user_error_naming_the_flag():
    from data_prep.tokens import MessageCounter, encoding_for_model

    with pytest.raises(UserError, match=r"--model 'llama-3-8b'.*`model`.*gpt-4o") as e:
        encoding_for_model("llama-3-8b")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--model"):
        MessageCounter("not-a-model", expected_examples=10**6)


def test_unknown_model_fails_build_and_stats_in_one_line(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("text,label\na,b\n", encoding="utf-8")
    assert main(["build", "--input", str(src), "--out", str(tmp_path / "o"), "--user", "{{ text }}",
                 "--assistant", "{{ label }}", "-q", "--model", "nope-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model 'nope-1'") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    assert main(["stats", str(data), "--model", "nope-1", "--no-plot"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------- .tsv is tab-separated by default


def _build(src: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--input", str(src), "--out", str(out), "--user", "{{ text }}",
            "--assistant", "{{ label }}", "-q", "--valid-fraction", "0", *extra]


def test_tsv_builds_without_delimiter(tmp_path):
    src = tmp_path / "in.tsv"
    src.write_bytes(b'text\tlabel\nhello, world\tpos\nsays "hi, you"\tneg\na,"b\tc\n"multi\nline, yes"\tx\n')
    assert main(_build(src, tmp_path / "o")) == 0
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["columns"] == ["text", "label"] and report["rows_out"]["train"] == 4
    rows = [json.loads(line)["messages"] for line in (tmp_path / "o/train.jsonl").read_text().splitlines()]
    assert sorted((m[0]["content"], m[1]["content"]) for m in rows) == sorted(
        [("hello, world", "pos"), ('says "hi, you"', "neg"), ('a,"b', "c"), ("multi\nline, yes", "x")])


def test_explicit_delimiter_still_wins(tmp_path):
    src = tmp_path / "commas.tsv"
    src.write_bytes(b"text,label\nhello,pos\n")
    assert main(_build(src, tmp_path / "o", "--delimiter", ",")) == 0
    assert json.loads((tmp_path / "o/report.json").read_text())["columns"] == ["text", "label"]


def test_ragged_tsv_row_names_its_line(tmp_path, capsys):
    src = tmp_path / "r.tsv"
    # line 4's `"b` opens a quote for a comma reader: the line number must come from a tab reader
    src.write_bytes(b'text\tlabel\n"multi\nline"\tx\nok\ty\na,"b\tc\nd\te\tf\ng\th\n')
    assert main(_build(src, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "r.tsv:6: expected 2 columns, found 3" in err and "tabs" in err, err


def test_csv_delimiter_by_extension():
    from data_prep.sources import csv_delimiter

    assert csv_delimiter(Path("a.TSV"), None) == "\t"
    assert csv_delimiter(Path("a.csv"), None) == ","
    assert csv_delimiter(Path("a.txt"), None) == ","
    assert csv_delimiter(Path("a.tsv"), ";") == ";"


# ---------------------------------------------------------------- plots never switch the backend


@pytest.fixture
def foreign_backend(monkeypatch):
    """Pretend a notebook chose its own backend; the plot functions must leave it alone."""
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "backend", "svg")
    assert matplotlib.get_backend() == "svg"
    return "svg"


def test_stats_histogram_keeps_the_backend(foreign_backend, tmp_path):
    import matplotlib

    from data_prep.stats import histogram

    out = histogram([3, 5, 8, 8, 13, 21, 40], tmp_path / "h" / "tokens.png", "t", limit=45)
    assert matplotlib.get_backend() == foreign_backend
    assert out.read_bytes().startswith(PNG)


def test_openai_plot_keeps_the_backend(foreign_backend, tmp_path):
    import matplotlib

    from train.jobs.results import plot_results

    rows = [{"step": "1", "train_loss": "2.0", "train_accuracy": "0.4", "valid_loss": "",
             "valid_mean_token_accuracy": ""},
            {"step": "2", "train_loss": "1.5", "train_accuracy": "0.5", "valid_loss": "1.6",
             "valid_mean_token_accuracy": "0.5"}]
    out = plot_results(rows, tmp_path / "p" / "results.png", "job")
    assert matplotlib.get_backend() == foreign_backend
    assert out.read_bytes().startswith(PNG)


def test_sft_plot_metrics_keeps_the_backend(foreign_backend, tmp_path):
    import matplotlib

    from train.sft import plot_metrics

    recs = [{"step": 1, "loss": 2.0, "mean_token_accuracy": 0.3}, {"step": 2, "loss": 1.2},
            {"step": 2, "eval_loss": 1.4, "eval_mean_token_accuracy": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    written = plot_metrics(tmp_path)
    assert matplotlib.get_backend() == foreign_backend
    assert sorted(Path(p).name for p in written) == ["accuracy.png", "loss.png"]
    assert all(Path(p).read_bytes().startswith(PNG) for p in written)
