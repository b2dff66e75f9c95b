"""data_prep: build (accounting, split, sampling, cleaning, formats), bad input, validate, stats."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from data_prep.__main__ import main
from data_prep.build import BuildConfig, build
from data_prep.clean import clean_text
from tunekit.config import load_config
from tunekit.errors import UserError

USE_CASES = sorted(p.parent.name for p in (ROOT / "configs").glob("*/build.yaml"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def write_csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8") -> Path:
    with path.open("w", encoding=encoding, newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def accounted(report: dict) -> bool:
    return report["rows_in"] == sum(report["rows_out"].values()) + sum(report["rows_dropped"].values())


# ---------------------------------------------------------------- every use case builds


def test_five_use_cases_are_shipped():
    assert set(USE_CASES) >= {"app_reviews", "assistant", "banking77", "imdb", "sensors"}


@pytest.mark.parametrize("use_case", USE_CASES)
def test_every_use_case_config_builds_and_validates(use_case, tmp_path):
    cfg = load_config(BuildConfig, ROOT / "configs" / use_case / "build.yaml", {"out": str(tmp_path)})
    cfg.input = str(ROOT / cfg.input)
    report = build(cfg, progress=False)
    assert accounted(report), report
    assert report["rows_out"]["train"] >= 10 and report["rows_out"]["valid"] >= 10
    for name in ("train.jsonl", "valid.jsonl"):
        rows = read_jsonl(tmp_path / name)
        assert len(rows) == report["rows_out"][name.split(".")[0]]
        assert all(ex["messages"][-1]["role"] == "assistant" for ex in rows)
    assert main(["validate", str(tmp_path / "train.jsonl"), str(tmp_path / "valid.jsonl")]) == 0


def test_app_reviews_fixture_keeps_the_real_files_shape_and_warts():
    path = ROOT / "configs/app_reviews/data/spotify_reviews_sample.csv"
    rows = list(csv.reader(path.open(encoding="utf-8", newline="")))
    assert rows[0] == ["", "review_id", "pseudo_author_id", "author_name", "review_text", "review_rating",
                       "review_likes", "author_app_version", "review_timestamp"]
    body = rows[1:]
    assert {len(r) for r in body} == {9}
    assert any(r[4] == "" for r in body) and any(r[7] == "" for r in body)   # empty cells
    assert any("\n" in r[4] for r in body)                                   # multi-line quoted text
    assert any(any(ord(ch) > 0x1F000 for ch in r[4]) for r in body)          # emoji


def test_banking77_answers_are_json_with_a_known_category(tmp_path):
    cfg = load_config(BuildConfig, ROOT / "configs/banking77/build.yaml",
                      {"out": str(tmp_path), "sample": 400})
    build(cfg, progress=False)
    categories = set(json.loads((ROOT / "configs/banking77/data/categories.json").read_text()))
    answers = [json.loads(ex["messages"][-1]["content"]) for ex in read_jsonl(tmp_path / "train.jsonl")]
    assert answers and all(set(a) == {"category"} and a["category"] in categories for a in answers)


def test_sensor_generator_reproduces_the_shipped_file(tmp_path):
    from data_prep.generate_sensors import generate, write_csv as write_sensors

    out = tmp_path / "s.csv"
    write_sensors(generate(600, 7), out)
    assert out.read_bytes() == (ROOT / "configs/sensors/data/sensor_readings.csv").read_bytes()


# ---------------------------------------------------------------- accounting, split, sampling


@pytest.fixture
def labelled_csv(tmp_path) -> Path:
    """300 rows, skewed labels (200/80/20), 10 exact duplicates, 6 empty texts, 4 empty labels."""
    rows = []
    for i in range(300):
        label = "a" if i < 200 else "b" if i < 280 else "c"
        rows.append([i, f"text number {i} <br />about &amp; things", label])
    for i in range(10):
        rows.append([1000 + i, "text number 5 <br />about &amp; things", "a"])   # dupes of row 5
    rows += [[2000 + i, "   ", "a"] for i in range(6)]
    rows += [[3000 + i, f"unlabelled {i}", ""] for i in range(4)]
    return write_csv(tmp_path / "in.csv", ["id", "text", "label"], rows)


def build_args(src: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--input", str(src), "--out", str(out), "--user", "{{ text }}",
            "--assistant", "{{ label }}", "--dropna", "text", "label", "-q", *extra]


def test_every_row_is_accounted_for(labelled_csv, tmp_path):
    assert main(build_args(labelled_csv, tmp_path / "o", "--valid-fraction", "0.25")) == 0
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["rows_in"] == 320
    assert report["rows_dropped"] == {"empty:text": 6, "empty:label": 4}
    assert sum(report["rows_out"].values()) == 310
    assert accounted(report)


def test_duplicates_never_straddle_the_split_and_dedupe_drops_them(labelled_csv, tmp_path):
    for seed in range(5):
        main(build_args(labelled_csv, tmp_path / "o", "--valid-fraction", "0.5", "--seed", str(seed)))
        train = {json.dumps(e) for e in read_jsonl(tmp_path / "o/train.jsonl")}
        valid = {json.dumps(e) for e in read_jsonl(tmp_path / "o/valid.jsonl")}
        assert not train & valid
    main(build_args(labelled_csv, tmp_path / "d", "--dedupe"))
    report = json.loads((tmp_path / "d/report.json").read_text())
    assert report["rows_dropped"]["duplicate"] == 10 and accounted(report)


def test_stratify_keeps_label_proportions(labelled_csv, tmp_path):
    main(build_args(labelled_csv, tmp_path / "o", "--stratify", "label", "--valid-fraction", "0.3", "--dedupe"))
    labels = {name: Counter(ex["messages"][-1]["content"] for ex in read_jsonl(tmp_path / f"o/{name}.jsonl"))
              for name in ("train", "valid")}
    for label, total in {"a": 200, "b": 80, "c": 20}.items():
        assert labels["valid"][label] == round(total * 0.3)
        assert labels["train"][label] == total - round(total * 0.3)


def test_split_and_sample_are_seeded_and_reproducible(labelled_csv, tmp_path):
    outs = []
    for run, seed in enumerate([7, 7, 8]):
        main(build_args(labelled_csv, tmp_path / f"o{run}", "--sample", "50", "--seed", str(seed)))
        outs.append((tmp_path / f"o{run}/train.jsonl").read_text() + (tmp_path / f"o{run}/valid.jsonl").read_text())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    report = json.loads((tmp_path / "o0/report.json").read_text())
    assert sum(report["rows_out"].values()) == 50
    assert report["rows_dropped"]["not_sampled"] == 310 - 50 and accounted(report)


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_sample_is_uniform_over_rows_even_when_texts_repeat(tmp_path, ext):
    """Half the rows share one text; a uniform sample keeps about half of them (not all or none)."""
    rows = [[i, "Good" if i % 2 else f"review {i}", "x"] for i in range(2000)]
    if ext == "csv":
        src = write_csv(tmp_path / "in.csv", ["id", "text", "label"], rows)
    else:
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "text": t, "label": l}) + "\n" for i, t, l in rows))
    for seed in (1, 2, 3):
        main(build_args(src, tmp_path / "o", "--sample", "400", "--seed", str(seed), "--valid-fraction", "0"))
        texts = [e["messages"][0]["content"] for e in read_jsonl(tmp_path / "o/train.jsonl")]
        assert len(texts) == 400 and 140 <= texts.count("Good") <= 260


def test_cleaning_strips_html_entities_and_normalises_unicode():
    assert clean_text("Great.<br /><br />Loved it &amp; more") == "Great.\n\nLoved it & more"
    assert clean_text("  two   spaces\u00a0here \n\n\n\n next ") == "two spaces here\n\nnext"
    assert clean_text("Cafe\u0301 <b>bold</b>") == "Caf\u00e9 bold"


def test_cleaning_applies_to_data_not_to_templates(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["q", "a"], [[f"x{i}<br />y &amp; z", "ok"] for i in range(3)])
    main(["build", "--input", str(src), "--out", str(tmp_path / "o"), "--system", "Answer as <label>.",
          "--user", "{{ q }}", "--assistant", "{{ a }}", "--valid-fraction", "0", "-q"])
    ex = read_jsonl(tmp_path / "o/train.jsonl")[0]["messages"]
    assert ex[0]["content"] == "Answer as <label>."
    assert ex[1]["content"].endswith("\ny & z")


def test_lookup_filter_maps_values_and_counts_unmapped_rows(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["text", "rating"],
                    [["good", "5"], ["bad", "1.0"], ["meh", "3"], ["odd", "9"]])
    main(["build", "--input", str(src), "--out", str(tmp_path / "o"), "--user", "{{ text }}",
          "--assistant", "{{ rating | lookup({1: 'negative', 3: 'neutral', 5: 'positive'}) }}",
          "--valid-fraction", "0", "-q"])
    report = json.loads((tmp_path / "o/report.json").read_text())
    answers = {e["messages"][0]["content"]: e["messages"][1]["content"] for e in read_jsonl(tmp_path / "o/train.jsonl")}
    assert answers == {"good": "positive", "bad": "negative", "meh": "neutral"}
    assert report["rows_dropped"] == {"template_error": 1}
    assert "'9' not in the lookup table" in report["drop_examples"]["template_error"][0]


def test_derive_with_lookup_file_groups_values_and_stratifies_by_the_derived_column(tmp_path):
    (tmp_path / "groups.yaml").write_text("fruit: [apple, pear]\nveg: [leek, kale]\n")
    src = write_csv(tmp_path / "in.csv", ["text", "item"],
                    [[f"t{i}", item] for i, item in enumerate(["apple", "pear", "leek", "kale"] * 5 + ["rock"])])
    groups = str(tmp_path / "groups.yaml")
    assert main(["build", "--input", str(src), "--out", str(tmp_path / "o"), "--user", "{{ text }}",
                 "--derive", f"group={{{{ item | lookup_file('{groups}') }}}}", "shout={{ group | upper }}",
                 "--assistant", "{{ shout }}/{{ item }}", "--stratify", "group", "--valid-fraction", "0.2",
                 "-q"]) == 0
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["rows_dropped"] == {"template_error": 1} and accounted(report)
    assert report["drop_examples"]["template_error"][0].endswith(f"derive.group: value 'rock' not in {groups} "
                                                                 "(4 values)")
    assert report["labels"] == {"train": {"fruit": 8, "veg": 8}, "valid": {"fruit": 2, "veg": 2}}
    answers = {e["messages"][-1]["content"] for e in read_jsonl(tmp_path / "o/train.jsonl")}
    assert answers == {"FRUIT/apple", "FRUIT/pear", "VEG/leek", "VEG/kale"}
    # value: result pairs and a default work too
    (tmp_path / "pairs.yaml").write_text("apple: red\n")
    assert main(["build", "--input", str(src), "--out", str(tmp_path / "p"), "--user", "{{ text }}",
                 "--assistant", f"{{{{ item | lookup_file('{tmp_path / 'pairs.yaml'}', 'other') }}}}",
                 "--valid-fraction", "0", "-q"]) == 0
    assert Counter(e["messages"][-1]["content"] for e in read_jsonl(tmp_path / "p/train.jsonl")) == {
        "red": 5, "other": 16}


@pytest.mark.parametrize("mapping, args, message", [
    ("a: [x, y]\nb: [y]\n", [], "'y' is listed under both 'a' and 'b'; list each value once"),
    ("- x\n- y\n", [], "expected a mapping, value: result or result: [values, ...]"),
    (None, [], "lookup_file: {dir}/missing.yaml not found (paths are relative to the working directory"),
    ("a: [x]\n", ["--derive", "text={{ item }}"], "derive: text is already a column of"),
])
def test_lookup_file_and_derive_mistakes_are_one_line(mapping, args, message, tmp_path):
    name = "missing.yaml" if mapping is None else "map.yaml"
    if mapping is not None:
        (tmp_path / name).write_text(mapping)
    src = write_csv(tmp_path / "in.csv", ["text", "item"], [["t", "x"]] * 3)
    proc = run_cli("-m", "data_prep", "build", "--input", str(src), "--out", str(tmp_path / "o"), "--user",
                   "{{ text }}", "--assistant", f"{{{{ item | lookup_file('{tmp_path / name}') }}}}", *args,
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message.format(dir=tmp_path) in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_max_tokens_drops_long_examples_with_a_reason(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["text", "label"], [["word " * n, "x"] for n in (5, 10, 400)])
    main(build_args(src, tmp_path / "o", "--max-tokens", "100", "--valid-fraction", "0"))
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["rows_dropped"] == {"over_max_tokens": 1} and report["rows_out"]["train"] == 2


# ---------------------------------------------------------------- input formats


def test_bom_multiline_and_empty_cells(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\n\"two\nlines, with comma\",a\n,b\nplain,\n".encode("utf-8"))
    main(build_args(path, tmp_path / "o", "--valid-fraction", "0"))
    rows = read_jsonl(tmp_path / "o/train.jsonl")
    assert [r["messages"][0]["content"] for r in rows] == ["two\nlines, with comma"]
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["rows_dropped"] == {"empty:text": 1, "empty:label": 1}


def test_other_encodings_via_flag(tmp_path):
    src = write_csv(tmp_path / "latin.csv", ["text", "label"], [["café crème", "é"]] * 3, encoding="latin-1")
    assert main(build_args(src, tmp_path / "bad")) == 2                       # read as UTF-8: clear error
    assert main(build_args(src, tmp_path / "o", "--encoding", "latin-1", "--valid-fraction", "0")) == 0
    assert read_jsonl(tmp_path / "o/train.jsonl")[0]["messages"][0]["content"] == "café crème"


def test_jsonl_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": f"t{i}", "label": "yes" if i % 2 else "no", "n": i} for i in range(20)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    results = []
    for name in ("in.jsonl", "in.parquet"):
        assert main(build_args(tmp_path / name, tmp_path / name.replace(".", "_"), "--stratify", "label")) == 0
        results.append(json.loads((tmp_path / name.replace(".", "_") / "report.json").read_text()))
    for r in results:
        assert r["rows_in"] == 20 and r["rows_out"] == {"train": 16, "valid": 4}


def test_conversations_jsonl_multi_turn_is_kept_whole(tmp_path):
    convo = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]}
    bad = {"messages": [{"role": "narrator", "content": "x"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(convo) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    main(["build", "--input", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o"), "--system", "Be brief.",
          "--valid-fraction", "0", "-q"])
    rows = read_jsonl(tmp_path / "o/train.jsonl")
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    report = json.loads((tmp_path / "o/report.json").read_text())
    assert report["rows_dropped"] == {"template_error": 1} and accounted(report)


# ---------------------------------------------------------------- bad input


def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


BAD_INPUTS = {
    "ragged": ("r.csv", b"text,label\na,b\nc,d,e\n", "r.csv:3: expected 2 columns, found 3"),
    "unclosed quote": ("q.csv", b'text,label\na,b\n"never closed,d\ne,f\n', "q.csv:3: a quoted value is never closed"),
    "empty file": ("e.csv", b"", "e.csv: the file is empty"),
    "header only": ("h.csv", b"text,label\n", "h.csv: no data rows"),
    "binary": ("b.csv", bytes(range(256)) * 20, "b.csv: looks like a binary file"),
    "invalid utf-8": ("u.csv", b"text,label\nok,a\nbad \xff\xfe byte,b\n", "u.csv:3: invalid UTF-8"),
    "jsonl not json": ("j.jsonl", b'{"text": "a", "label": "b"}\n{"text": oops}\n', "j.jsonl:2: not valid JSON"),
    "jsonl not object": ("k.jsonl", b'{"text": "a", "label": "b"}\n[1, 2]\n', "k.jsonl:2: expected a JSON object"),
    "missing column": ("m.csv", b"txt,label\na,b\n", "m.csv: no column(s) text; the file has: txt, label"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, tmp_path):
    name, content, expected = BAD_INPUTS[case]
    src = _bad(tmp_path, name, content)
    out = tmp_path / "out"
    proc = run_cli("-m", "data_prep", *build_args(src, out))
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_template_errors_name_the_key_and_the_columns(tmp_path):
    src = write_csv(tmp_path / "in.csv", ["text", "label"], [["a", "b"]])
    with pytest.raises(UserError, match=r"no column\(s\) review; the file has: text, label"):
        build(BuildConfig(input=str(src), out=str(tmp_path / "o"), user="{{ review }}", assistant="{{ label }}"))
    with pytest.raises(UserError, match="user: template syntax error"):
        build(BuildConfig(input=str(src), out=str(tmp_path / "o"), user="{{ text ", assistant="{{ label }}"))


def test_config_unknown_key_is_an_error_naming_it(tmp_path):
    (tmp_path / "c.yaml").write_text("input: x.csv\nvalid_fractoin: 0.3\n")
    proc = run_cli("-m", "data_prep", "build", "--config", str(tmp_path / "c.yaml"))
    assert proc.returncode == 2 and "unknown config key(s) valid_fractoin" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_flags_override_the_config_file(tmp_path):
    cfg = load_config(BuildConfig, ROOT / "configs/banking77/build.yaml", {"seed": 7, "out": "x"})
    assert cfg.seed == 7 and cfg.out == "x" and cfg.stratify == "category"


def test_failed_build_leaves_previous_outputs_untouched(labelled_csv, tmp_path):
    out = tmp_path / "o"
    main(build_args(labelled_csv, out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ragged = _bad(tmp_path, "r.csv", b"text,label\na,b\nc,d,e\n")
    assert main(build_args(ragged, out)) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------- validate


def _jsonl(path: Path, examples: list) -> Path:
    path.write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in examples) + "\n", encoding="utf-8")
    return path


def good(i: int = 0) -> dict:
    return {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"},
                         {"role": "assistant", "content": "a"}]}


def test_validate_accepts_a_good_file(tmp_path):
    f = _jsonl(tmp_path / "ok.jsonl", [good(i) for i in range(12)])
    proc = run_cli("-m", "data_prep", "validate", str(f))
    assert proc.returncode == 0 and proc.stdout == ""


def test_validate_reports_each_cookbook_error_with_file_and_line(tmp_path):
    examples = [good(i) for i in range(10)] + [
        "[1, 2]",                                                                     # 11 data_type
        {"prompt": "x"},                                                              # 12 missing_messages_list
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},      # 13 missing key + content
        {"messages": [{"role": "user", "content": "q", "foo": 1}, {"role": "assistant", "content": "a"}]},  # 14
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},  # 15
        {"messages": [{"role": "user", "content": "q"}]},                             # 16 no assistant
        {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a", "weight": 2}]},  # 17
        '{"messages": [',                                                             # 18 invalid json
        {"messages": [{"role": "user", "content": "w " * 70_000}, {"role": "assistant", "content": "a"}]},  # 19
    ]
    f = _jsonl(tmp_path / "bad.jsonl", examples)
    proc = run_cli("-m", "data_prep", "validate", str(f))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    got = {tuple(line.split(": ")[0].rsplit(":", 1)[1:]) + (line.split(": ")[1],) for line in proc.stdout.splitlines()}
    expected = {("11", "data_type"), ("12", "missing_messages_list"), ("13", "message_missing_key"),
                ("13", "missing_content"), ("14", "message_unrecognized_key"), ("15", "unrecognized_role"),
                ("16", "example_missing_assistant_message"), ("17", "weight_not_assistant"),
                ("17", "invalid_weight"), ("18", "invalid_json"), ("19", "too_many_tokens")}
    assert got == expected
    assert all(line.startswith(f"{f}:") for line in proc.stdout.splitlines())


def test_validate_needs_ten_examples_and_handles_empty_files(tmp_path):
    few = _jsonl(tmp_path / "few.jsonl", [good(i) for i in range(3)])
    empty = _bad(tmp_path, "empty.jsonl", b"")
    proc = run_cli("-m", "data_prep", "validate", str(few), str(empty))
    assert proc.returncode == 1
    assert f"{few}:0: too_few_examples: 3 examples" in proc.stdout
    assert f"{empty}:0: empty_file" in proc.stdout


@pytest.mark.slow
def test_validate_local_model_rules(tmp_path, tiny_tokenizer_dir):
    long = {"messages": [{"role": "user", "content": "w1 " * 300}, {"role": "assistant", "content": "yes"}]}
    f = _jsonl(tmp_path / "t.jsonl", [good(i) for i in range(10)] + [long])
    proc = run_cli("-m", "data_prep", "validate", str(f), "--tokenizer", str(tiny_tokenizer_dir),
                   "--max-length", "64")
    assert proc.returncode == 1
    assert proc.stdout.strip().startswith(f"{f}:11: exceeds_max_length:")
    assert len(proc.stdout.strip().splitlines()) == 1


# ---------------------------------------------------------------- stats and tokens


def test_o200k_offline_file_matches_tiktoken_hash(tmp_path, monkeypatch):
    import hashlib

    from data_prep import tokens

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokens.ensure_o200k_cached.cache_clear()
    path = tokens.ensure_o200k_cached()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == tokens.O200K_SHA256
    tokens.encoding_for_model.cache_clear()
    enc = tokens.encoding_for_model("gpt-4o-mini-2024-07-18")
    assert enc.name == "o200k_base" and enc.decode(enc.encode("Héllo wörld 🎵")) == "Héllo wörld 🎵"
    tokens.encoding_for_model.cache_clear()
    tokens.ensure_o200k_cached.cache_clear()


def test_counts_match_the_cookbook_loop():
    import tiktoken

    from data_prep.tokens import MessageCounter, ensure_o200k_cached

    ensure_o200k_cached()
    enc = tiktoken.get_encoding("o200k_base")
    convo = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "¿Qué tal? 😀", "name": "ana"},
             {"role": "assistant", "content": '{"category": "card_arrival"}'}]
    cookbook = 3 + sum(3 + sum(len(enc.encode(v)) for v in m.values()) + ("name" in m) for m in convo)
    assert MessageCounter().messages(convo) == cookbook


def test_fast_counter_gives_tiktokens_counts_on_the_shipped_data():
    """The quicktok path used for large files must count exactly like tiktoken."""
    from data_prep.tokens import MessageCounter

    texts = [row[4] for row in csv.reader((ROOT / "configs/app_reviews/data/spotify_reviews_sample.csv").open(encoding="utf-8"))]
    texts += [json.dumps(json.loads(line)) for line in (ROOT / "configs/assistant/data/conversations.jsonl").open(encoding="utf-8")]
    texts += [r["review"] for r in csv.DictReader((ROOT / "configs/imdb/data/imdb_sample.csv").open(encoding="utf-8"))][:300]
    slow, fast = MessageCounter(), MessageCounter(expected_examples=10**6)
    assert fast.count is not slow.count
    assert [fast.text(t) for t in texts] == [slow.text(t) for t in texts]


def test_default_epochs_heuristic():
    from data_prep.stats import default_epochs

    assert default_epochs(10) == 10 and default_epochs(20) == 5 and default_epochs(1000) == 3
    assert default_epochs(20_000) == 1 and default_epochs(3) == 25


def test_stats_cost_estimate_and_histogram(tmp_path):
    f = _jsonl(tmp_path / "train.jsonl", [good(i) for i in range(40)])
    proc = run_cli("-m", "data_prep", "stats", str(f), "--epochs", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["examples"] == 40 and s["epochs"] == 5 and s["price_per_1m_training_tokens"] == 3.0
    assert s["estimated_cost_usd"] == round(s["billed_tokens_per_epoch"] * 5 * 3.0 / 1e6, 4)
    t = s["tokens_per_example"]
    assert t["min"] <= t["p5"] <= t["median"] <= t["p95"] <= t["max"]
    png = Path(s["plot"])
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run_cli("-m", "data_prep", "stats", str(f), "--no-plot")
    assert "epochs: 3 (default heuristic)" in text.stdout and "estimated OpenAI training cost: $" in text.stdout


@pytest.mark.slow
def test_stats_with_a_local_tokenizer(tmp_path, tiny_tokenizer_dir):
    f = _jsonl(tmp_path / "train.jsonl", [good(i) for i in range(10)])
    proc = run_cli("-m", "data_prep", "stats", str(f), "--tokenizer", str(tiny_tokenizer_dir), "--json", "--no-plot")
    s = json.loads(proc.stdout)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    expected = len(tok(tok.apply_chat_template(good(0)["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
    assert s["tokens_per_example"]["min"] == expected and s["estimated_cost_usd"] is None


def test_help_for_every_command():
    for cmd in ("build", "validate", "stats"):
        proc = run_cli("-m", "data_prep", cmd, "--help")
        assert proc.returncode == 0 and "usage:" in proc.stdout
