"""Reading CSV, JSONL and Parquet inputs, with the cheap row-level work pushed into DuckDB.

For CSV and Parquet, one DuckDB query reads only the columns the templates use, applies
``fillna`` and ``dropna`` (counting each dropped row with the first empty column as its reason),
and, when sampling, keeps a seeded reservoir of candidates (``min_by`` over a hash of the row): one
pass over the file, memory bounded by the sample, the file's other columns never materialised.
JSONL is read in Python line by line so that a bad line is reported with its number.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tunekit.errors import UserError

FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Source:
    """What a reader hands to ``build``: the accounting so far and the rows to turn into examples."""

    path: Path
    format: str
    columns: list[str]
    rows_in: int = 0
    dropped: Counter = field(default_factory=Counter)
    rows: list[dict] = field(default_factory=list)   # in sampling-key order when sampling
    sampled_out: int = 0                              # rows passed over by the sample


def csv_delimiter(path: Path, delimiter: str | None) -> str:
    """The delimiter to read with: an explicit one wins, else tab for ``.tsv`` and comma otherwise."""
    if delimiter is not None:
        return delimiter
    return "\t" if path.suffix.lower() == ".tsv" else ","


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in ("csv", "jsonl", "parquet"):
            raise UserError(f"--format {fmt}: use csv, jsonl or parquet")
        return fmt
    got = FORMATS.get(path.suffix.lower())
    if not got:
        raise UserError(f"{path}: cannot tell the format from the extension '{path.suffix}'; "
                        "pass --format csv|jsonl|parquet")
    return got


def check_readable(path: Path, fmt: str) -> None:
    """Missing, empty and binary files fail here, before any real work."""
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    if fmt == "parquet":
        with path.open("rb") as f:
            if f.read(4) != b"PAR1":
                raise UserError(f"{path}: not a Parquet file (no PAR1 magic); pass --format if it is CSV or JSONL")
        return
    with path.open("rb") as f:
        head = f.read(65536)
    if b"\x00" in head and not head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{path}: looks like a binary file (NUL bytes), not {fmt.upper()} text")


def _is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _line_of(message: str) -> str | None:
    m = re.search(r"on Line: (\d+)", message)
    return m.group(1) if m else None


def _physical_line(path: Path, record: int, encoding: str, delimiter: str) -> int:
    """DuckDB numbers CSV records (header = 1); editors number lines. Map one to the other."""
    if record <= 1:
        return record
    try:
        with path.open("r", encoding="utf-8-sig" if encoding in ("utf-8", "utf8") else encoding,
                       errors="replace", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            for _ in range(record - 1):
                next(reader)
            return reader.line_num + 1
    except (csv.Error, StopIteration):
        return record


def _duckdb_error(path: Path, e: Exception, encoding: str, delimiter: str = ",") -> UserError:
    """One line from DuckDB's multi-line CSV error, with the fix."""
    msg = str(e)
    line = _line_of(msg)
    where = f"{path}:{_physical_line(path, int(line), encoding, delimiter)}" if line else str(path)
    if "unterminated quote" in msg:
        return UserError(f"{where}: a quoted value is never closed (unterminated quote); "
                         "fix the quoting or escape quotes inside values as \"\"")
    m = re.search(r"Expected Number of Columns: (\d+) Found: (\d+)", msg)
    if m:
        what = {",": "commas", "\t": "tabs", ";": "semicolons"}.get(delimiter, repr(delimiter))
        return UserError(f"{where}: expected {m.group(1)} columns, found {m.group(2)} "
                         f"(ragged row); fix the row or quote values that contain {what}")
    if "Invalid unicode" in msg or "not utf-8" in msg:
        return UserError(f"{where}: invalid UTF-8 (file read as {encoding}); "
                         "pass --encoding with the file's real encoding, e.g. --encoding latin-1")
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return UserError(f"{where}: cannot read the file: {first}")


def csv_header(path: Path, encoding: str, delimiter: str) -> list[str]:
    try:
        # errors="replace": the decoder reads ahead, and a bad byte further down is DuckDB's to report
        with path.open("r", encoding="utf-8-sig" if encoding in ("utf-8", "utf8") else encoding,
                       errors="replace", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except LookupError:
        raise UserError(f"--encoding {encoding}: unknown encoding; use a Python codec name "
                        "such as utf-8, latin-1, cp1252, utf-16, shift_jis") from None
    except csv.Error as e:
        raise UserError(f"{path}:1: cannot parse the header: {e}") from None
    if not header or all(not h.strip() for h in header) and len(header) <= 1:
        raise UserError(f"{path}:1: no header row; the first line must name the columns")
    if any("\ufffd" in h for h in header):
        raise UserError(f"{path}:1: invalid {encoding} in the header; "
                        "pass --encoding with the file's real encoding")
    names = [h.strip() or f"column{i}" for i, h in enumerate(header)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{path}:1: duplicate column name(s) {', '.join(dupes)}; rename them in the header")
    return names


def transcode_to_utf8(path: Path, encoding: str) -> Path:
    """Stream a file in another encoding into a temporary UTF-8 copy (errors name the line)."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"--encoding {encoding}: unknown encoding; use a Python codec name "
                        "such as utf-8, latin-1, cp1252, utf-16, shift_jis") from None
    fd, tmp = tempfile.mkstemp(suffix=".csv", prefix="data_prep_")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as out, \
            path.open("r", encoding=encoding, newline="") as src:
        lineno = 0
        try:
            for lineno, line in enumerate(src, 1):
                out.write(line)
        except UnicodeDecodeError as e:
            os.unlink(tmp)
            raise UserError(f"{path}:{lineno + 1}: not valid {encoding} ({e.reason}); "
                            "pass --encoding with the file's real encoding") from None
    return Path(tmp)


def read_tabular(path: Path, fmt: str, needed: list[str], fillna: dict[str, str], dropna: list[str],
                 sample: int | None, seed: int, encoding: str = "utf-8",
                 delimiter: str | None = None, keep: dict[str, list[str]] | None = None) -> Source:
    """``delimiter`` None: by the extension (tab for .tsv, comma otherwise)."""
    import duckdb

    tmp = None
    delimiter = csv_delimiter(path, delimiter)
    enc = encoding.lower().replace("_", "-")
    if fmt == "csv":
        columns = csv_header(path, encoding, delimiter)
        data_path = path
        if enc not in ("utf-8", "utf8", "utf-8-sig"):
            data_path = tmp = transcode_to_utf8(path, encoding)
        col_types = "{" + ", ".join(f"{_sql_str(c)}: 'VARCHAR'" for c in columns) + "}"
        scan = (f"read_csv({_sql_str(str(data_path))}, delim={_sql_str(delimiter)}, quote='\"', "
                f"escape='\"', header=true, columns={col_types}, auto_detect=false, "
                "strict_mode=true, parallel=true)")
    else:
        scan = f"read_parquet({_sql_str(str(path))})"
        try:
            columns = [r[0] for r in duckdb.sql(f"DESCRIBE SELECT * FROM {scan}").fetchall()]
        except duckdb.Error as e:
            raise UserError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}") from None

    missing = [c for c in [*needed, *fillna, *dropna] if c not in columns]
    if missing:
        raise UserError(f"{path}: no column(s) {', '.join(dict.fromkeys(missing))}; "
                        f"the file has: {', '.join(columns)}")
    use = list(dict.fromkeys([*needed, *dropna]))

    def expr(c: str) -> str:
        v = f"CAST({_sql_ident(c)} AS VARCHAR)"
        if c in fillna:
            v = f"coalesce(nullif(trim({v}), ''), {_sql_str(str(fillna[c]))})"
        return f"{v} AS {_sql_ident(c)}"

    reason = "NULL"
    whens = [f"WHEN nullif(trim({_sql_ident(c)}), '') IS NULL THEN {_sql_str('empty:' + c)}" for c in dropna]
    whens += [f"WHEN coalesce({_sql_ident(c)}, '') NOT IN ({', '.join(_sql_str(str(v)) for v in values)}) "
              f"THEN {_sql_str('not_kept:' + c)}" for c, values in (keep or {}).items()]
    if whens:
        reason = f"CASE {' '.join(whens)} ELSE NULL END"
    # The sampling key hashes the whole row, not just the columns used: rows that merely share a
    # text (short reviews like "Good") must each get their own chance of being picked.
    row_key = f"hash({int(seed)}, {', '.join(_sql_ident(c) for c in columns)}) AS __key"
    inner = f"SELECT {', '.join([*(expr(c) for c in use), *([row_key] if sample else [])])} FROM {scan}"
    src = Source(path=path, format=fmt, columns=columns)
    con = duckdb.connect()
    con.execute(f"SET threads TO {max(1, os.cpu_count() or 1)}")
    try:
        if sample:
            pack = "struct_pack(" + ", ".join(f"{_sql_ident(c)} := {_sql_ident(c)}" for c in use) + ")"
            query = (f"SELECT reason, count(*), CASE WHEN reason IS NULL THEN min_by({pack}, __key, {int(sample)}) END "
                     f"FROM (SELECT *, {reason} AS reason FROM ({inner})) GROUP BY reason")
            for why, n, picked in con.execute(query).fetchall():
                src.rows_in += n
                if why is None:
                    src.rows = list(picked)
                    src.sampled_out = n - len(src.rows)
                else:
                    src.dropped[why] += n
        else:
            cur = con.execute(f"SELECT *, {reason} AS __reason FROM ({inner})")
            while batch := cur.fetchmany(50_000):
                for row in batch:
                    src.rows_in += 1
                    if row[-1] is not None:
                        src.dropped[row[-1]] += 1
                    else:
                        src.rows.append(dict(zip(use, row[:-1])))
    except duckdb.Error as e:
        raise _duckdb_error(path, e, encoding, delimiter) from None
    finally:
        con.close()
        if tmp:
            os.unlink(tmp)
    return src


def jsonl_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, object, str | None]]:
    """(line number, parsed value, error) for each non-blank line; a bad line gives an error message."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 and encoding in ("utf-8", "utf8") else encoding)
            except UnicodeDecodeError as e:
                yield lineno, None, (f"invalid {encoding} ({e.reason}); "
                                     "pass --encoding with the file's real encoding")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, (f"not valid JSON ({e.msg} at column {e.colno}); "
                                     "each line must be one JSON object")


def iter_jsonl(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; the first bad line is a UserError."""
    for lineno, value, error in jsonl_lines(path, encoding):
        if error:
            raise UserError(f"{path}:{lineno}: {error}")
        yield lineno, value


def read_jsonl(path: Path, needed: list[str], fillna: dict[str, str], dropna: list[str],
               sample: int | None, seed: int, encoding: str = "utf-8",
               keep: dict[str, list[str]] | None = None) -> Source:
    src = Source(path=path, format="jsonl", columns=[])
    keep = {c: {str(v) for v in values} for c, values in (keep or {}).items()}
    seen_cols: dict[str, None] = {}
    kept: list[dict] = []
    for lineno, obj in iter_jsonl(path, encoding):
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        src.rows_in += 1
        seen_cols.update(dict.fromkeys(obj))
        row = {k: obj.get(k) for k in dict.fromkeys([*needed, *dropna])}
        for c, v in fillna.items():
            if _is_empty(row.get(c)):
                row[c] = v
        why = next((f"empty:{c}" for c in dropna if _is_empty(row.get(c))), None)
        why = why or next((f"not_kept:{c}" for c, values in keep.items() if str(row.get(c)) not in values), None)
        if why:
            src.dropped[why] += 1
            continue
        row["__line"] = lineno
        kept.append(row)
    src.columns = list(seen_cols)
    missing = [c for c in [*needed, *dropna] if c not in seen_cols] if src.rows_in else []
    if missing:
        raise UserError(f"{path}: no field(s) {', '.join(dict.fromkeys(missing))} in any line; "
                        f"the file has: {', '.join(src.columns)}")
    if sample and len(kept) > sample:
        def key(row):
            # the line number makes every row its own draw, even rows with the same text
            return hashlib.blake2b(f"{seed}:{row['__line']}".encode(), digest_size=8).digest()
        kept.sort(key=key)
        src.sampled_out = len(kept) - sample
        kept = kept[:sample]
    src.rows = kept
    return src
