"""CSV reading (MMLU's question,A,B,C,D,answer files): rows with the line each starts on, and a file that is
not UTF-8 or not CSV reported as one line naming the file and the line, as JSONL's reader does."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path

from finemed_cli.errors import DataError


def iter_csv(path: str | os.PathLike[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) for each row of a UTF-8 CSV file (a leading byte-order mark is not text).

    Raises:
        DataError: `path:line: …` for a byte that is not UTF-8, or a row Python's csv module refuses (a field
            over its 128 KB limit, usually a quote left open that runs on to the end of the file; a NUL byte).
    """
    p = Path(path)
    data = p.read_bytes()  # benchmark CSVs are small (MMLU's largest subject: 0.4 MB); the whole file is checked
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte 0x{data[offset:offset + 1].hex()} at column {column}); "
                        "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    reader, start = csv.reader(io.StringIO(text, newline="")), 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{p}:{start}: not a CSV row Python can read ({e}); check the quoting from this line "
                            "on (a quote left open runs on to the end of the file)") from None
        number, start = start, reader.line_num + 1
        yield number, cells
