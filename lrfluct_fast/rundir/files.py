"""The run directory's files: names, atomic writes, the CSV and run.json readers."""
from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any, BinaryIO, Callable

import numpy as np



FORMAT = 1
RUN_FILE, METRICS_FILE, SUMMARY_DIR, TB_DIR = "run.json", "metrics.csv", "summaries", "tensorboard"
WINDOW_DIR = "windows"
SCALARS_FILE, SCALARS_HEADER = "scalars.csv", "step,name,value\n"
WINDOW_HEAD = ("step", "first_step", "last_step")  # the first values of a window record
SUMMARY_NAME = re.compile(r"step_(\d{9,})\.npz")


# -- files ------------------------------------------------------------------------------------
def csv_header(columns) -> str:
    return ",".join(["step", "layer", *columns]) + "\n"


def atomic_write(path: str, data: bytes | Callable[[BinaryIO], None]) -> None:
    """`path` written whole or not at all: `data` (bytes, or a function writing into a binary
    file) goes to a temp name first, which a failed write removes."""
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.tmp")
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def write_json(path: str, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def cut_partial_line(path: str, header: str) -> None:
    """Drop a last line without its newline (a write that was killed or failed)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            f.write(header.encode())
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.seek(0)
        f.truncate(0)
        f.write(header.encode())


def has_data(path: str) -> bool:
    """The directory holds logged steps: metrics or scalars rows, summaries or window records."""
    for name in (METRICS_FILE, SCALARS_FILE):
        try:
            with open(os.path.join(path, name), "rb") as f:
                head = f.read(65536)
            nl = head.find(b"\n")
            if nl >= 0 and len(head) > nl + 1:
                return True
        except FileNotFoundError:
            pass
    sdir, wdir = os.path.join(path, SUMMARY_DIR), os.path.join(path, WINDOW_DIR)
    if os.path.isdir(wdir) and any(f.endswith(".f64") and os.path.getsize(os.path.join(wdir, f))
                                   for f in os.listdir(wdir)):
        return True
    return os.path.isdir(sdir) and any(SUMMARY_NAME.fullmatch(f) for f in os.listdir(sdir))


def truncate_after(path: str, step: int, columns) -> None:
    """Keep what was logged up to `step`: metrics.csv and scalars.csv rewritten atomically,
    later summaries and leftover temp files removed."""
    _keep_rows_until(os.path.join(path, METRICS_FILE), step, "layer", csv_header(columns))
    scalars = os.path.join(path, SCALARS_FILE)
    if os.path.exists(scalars):
        _keep_rows_until(scalars, step, "name", SCALARS_HEADER)
    sdir = os.path.join(path, SUMMARY_DIR)
    os.makedirs(sdir, exist_ok=True)
    for name in os.listdir(sdir):
        m = SUMMARY_NAME.fullmatch(name)
        if m and int(m.group(1)) > step:
            os.remove(os.path.join(sdir, name))
    remove_temp_files(path)
    for statistic, layout in window_layouts(read_run_info(path)).items():
        cut_window_records(path, statistic, layout, after_step=step)


def _keep_rows_until(file: str, step: int, key: str, default_header: str) -> None:
    """The CSV `file` rewritten atomically with its rows of steps <= `step`."""
    header, rows = read_csv(file, key) if os.path.exists(file) else (None, [])
    buf = io.StringIO()
    buf.write(",".join(header) + "\n" if header else default_header)
    w = csv.writer(buf, lineterminator="\n")
    for _, row in rows:
        if int(row[0]) <= step:
            w.writerow(row)
    atomic_write(file, buf.getvalue().encode("utf-8"))


def window_file(path: str, statistic: str) -> str:
    return os.path.join(path, WINDOW_DIR, f"{statistic}.f64")


def window_layouts(info: dict[str, Any]) -> dict[str, list]:
    """{statistic: [[layer, key, neurons], ...]} of run.json's "windows"."""
    return {s: w["columns"] for s, w in (info.get("windows") or {}).items()}


def record_width(layout) -> int:
    return len(WINDOW_HEAD) + sum(n for _, _, n in layout)


def cut_window_records(path: str, statistic: str, layout, after_step: int | None = None) -> None:
    """Cut a window file to whole records (a write that was killed or failed leaves part of
    one), and with `after_step` drop the records of later steps (a resume)."""
    file = window_file(path, statistic)
    if not os.path.exists(file):
        return
    width = record_width(layout) * 8
    keep = os.path.getsize(file) // width
    if after_step is not None and keep:
        steps = np.memmap(file, dtype="<f8", mode="r", shape=(keep, width // 8))[:, 0]
        keep = int(np.searchsorted(steps, after_step, side="right"))
        del steps
    os.truncate(file, keep * width)


def is_temp_file(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def remove_temp_files(path: str) -> None:
    """Remove the temp files of writes that did not finish (killed or failed) from the run
    directory and its summaries/."""
    for folder in (path, os.path.join(path, SUMMARY_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if is_temp_file(name):
                    remove_quietly(os.path.join(folder, name))


def remove_quietly(file: str) -> None:
    try:
        os.remove(file)
    except OSError:
        pass  # gone already, or the filesystem refuses: load_run ignores temp files anyway


def read_csv(file: str, key: str = "layer") -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """(header, [(line number, row)]) of the complete lines of metrics.csv (key "layer") or
    scalars.csv (key "name"): columns step, key, then numbers; ValueError naming the file and
    line for anything that is not such a row."""
    kind = "metrics" if key == "layer" else "scalars"
    with open(file, "rb") as f:
        raw = f.read()
    raw = raw[:raw.rfind(b"\n") + 1]  # a partial last line is a killed write, not data
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"corrupt {kind} file {file}: {e}") from None
    if not rows:
        return None, []
    header = rows[0]
    if header[:2] != ["step", key]:
        raise ValueError(f"corrupt {kind} file {file}: line 1 is not the header 'step,{key},...'")
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"corrupt {kind} file {file}, line {i}: {len(row)} fields, "
                             f"the header has {len(header)}")
        try:
            int(row[0])
            [float(v) for v in row[2:]]
        except ValueError:
            raise ValueError(f"corrupt {kind} file {file}, line {i}: not a number in {row}") from None
        out.append((i, row))
    return header, out


# run.json's fields that load_run and a resume read, with the type each must have
RUN_FIELDS = {"format": int, "run_id": str, "layers": list, "neurons": dict, "options": dict,
              "metric_columns": list, "resumes": list, "windows": dict, "skipped": list,
              "coverage": dict}
_JSON_TYPES = {int: "integer", str: "string", list: "array", dict: "object"}


def read_run_info(path: str) -> dict[str, Any]:
    """run.json of the run directory `path`, checked; ValueError naming the path or the file."""
    if not os.path.exists(path):
        raise ValueError(f"{path} is not a run directory: it does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a run directory: it is a file (pass the directory "
                         f"that holds {RUN_FILE})")
    file = os.path.join(path, RUN_FILE)
    try:
        with open(file, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is not a run directory: it has no {RUN_FILE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt run file {file}: {e}") from None
    if not isinstance(info, dict) or not {"run_id", "layers", "format"} <= set(info):
        raise ValueError(f"corrupt run file {file}: not an lrfluct_fast run description")
    if info["format"] != FORMAT:
        raise ValueError(f"{file}: run directory format {info['format']!r}, this version reads {FORMAT}")
    for key, kind in RUN_FIELDS.items():
        if key in info and not isinstance(info[key], kind):
            raise ValueError(f"corrupt run file {file}: {key!r} must be a JSON "
                             f"{_JSON_TYPES[kind]}, got {json.dumps(info[key])}")
    for key in ("layers", "metric_columns"):
        if not all(isinstance(v, str) for v in info.get(key, [])):
            raise ValueError(f"corrupt run file {file}: {key!r} must list names (strings)")
    for statistic, w in info.get("windows", {}).items():
        columns = w.get("columns") if isinstance(w, dict) else None
        if not isinstance(columns, list) or not all(
                isinstance(c, list) and len(c) == 3 and isinstance(c[0], str)
                and isinstance(c[1], str) and isinstance(c[2], int) for c in columns):
            raise ValueError(f"corrupt run file {file}: windows[{statistic!r}] must hold "
                             f"'columns': [[layer, key, neurons], ...]")
    return info
