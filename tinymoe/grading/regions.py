"""Exercise regions: find `# BEGIN EXERCISE <id>` ... `# END EXERCISE`, stub them, splice them.

A region is the lines strictly between the two marker lines, which sit at the same indentation
inside one function body. The markers are comments, so the reference runs unchanged. Stubbing a
region keeps its comment lines (step numbers, the quoted `# forward: ...` lines) and, for each
statement that carried a trailing comment (a shape), the statement's target with the comment,
and the headers of `if` / `for` / ... blocks (the control flow, not the computation):

    dw = np.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)       # [D]
 -> # dw = ...                                                        # [D]

then the exercise's hint as comments and `raise ExerciseNotDone("<id>")`. The markers stay, so a
finished student file can be spliced back into a reference tree region by region.
"""
from __future__ import annotations

import io
import re
import textwrap
import tokenize
from typing import Dict, Iterable, List, NamedTuple, Tuple

BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN EXERCISE (?P<id>[a-z0-9-]+)[ \t]*$")
END = re.compile(r"^(?P<indent>[ \t]*)# END EXERCISE[ \t]*$")
IMPORT_LINE = "from tinymoe.grading import ExerciseNotDone  # raised by the exercise stubs below"
_TARGET = re.compile(r"^(?P<lhs>[A-Za-z_][\w\s,.\[\]:\"'(){}*-]*?)\s*(?P<op>[-+*/@]?=)(?!=)")
_HEADERS = ("if", "elif", "else", "for", "while", "with", "try", "except", "finally")


class Region(NamedTuple):
    exercise_id: str
    begin: int      # 0-based line index of the BEGIN marker
    end: int        # 0-based line index of the END marker
    indent: str     # the markers' indentation


def find_regions(text: str, source: str = "<text>") -> List[Region]:
    """All regions of a file, in order. ValueError (naming file and line) on a malformed marker."""
    regions, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        b, e = BEGIN.match(line), END.match(line)
        if line.lstrip().startswith(("# BEGIN EXERCISE", "# END EXERCISE")) and not (b or e):
            raise ValueError(f"{source}:{i + 1}: malformed exercise marker {line.strip()!r} "
                             f"(expected '# BEGIN EXERCISE <id>' with id in [a-z0-9-] or '# END EXERCISE')")
        if b:
            if open_ is not None:
                raise ValueError(f"{source}:{i + 1}: BEGIN EXERCISE {b['id']} inside the region "
                                 f"{open_[0]} opened at line {open_[1] + 1} (regions do not nest)")
            open_ = (b["id"], i, b["indent"])
        elif e:
            if open_ is None:
                raise ValueError(f"{source}:{i + 1}: END EXERCISE without a BEGIN EXERCISE")
            if e["indent"] != open_[2]:
                raise ValueError(f"{source}:{i + 1}: END EXERCISE is indented differently from "
                                 f"its BEGIN at line {open_[1] + 1}")
            regions.append(Region(open_[0], open_[1], i, open_[2]))
            open_ = None
    if open_ is not None:
        raise ValueError(f"{source}:{open_[1] + 1}: BEGIN EXERCISE {open_[0]} has no END EXERCISE")
    return regions


def _statements(body: List[str]) -> List[Tuple[int, int, List[Tuple[int, str]]]]:
    """Logical lines of a dedented block: (first line, last line, [(col, comment), ...])."""
    out, start, comments = [], None, []
    tokens = tokenize.generate_tokens(io.StringIO("".join(body)).readline)
    for tok in tokens:
        if tok.type in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NL and start is None:
            continue
        if start is None:
            start = tok.start[0] - 1
        if tok.type == tokenize.COMMENT:
            comments.append((tok.start[1], tok.string))
        if tok.type in (tokenize.NEWLINE, tokenize.NL) and (tok.type == tokenize.NEWLINE or
                                                             _only_comments(body, start, tok.start[0])):
            out.append((start, tok.start[0] - 1, comments))
            start, comments = None, []
    return out


def _only_comments(body: List[str], first: int, last_1based: int) -> bool:
    return all(not ln.strip() or ln.lstrip().startswith("#") for ln in body[first:last_1based])


def stub_lines(body: List[str], indent: str, exercise_id: str, hint: str) -> List[str]:
    """The stub replacing a region body (lines with their newlines), at the markers' indentation."""
    ded = textwrap.dedent("".join(body)).splitlines(keepends=True)
    pad = indent
    out: List[str] = []
    try:
        statements = _statements(ded)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        statements = [(i, i, [(len(ln) - len(ln.lstrip()), ln.strip())])
                      for i, ln in enumerate(ded) if ln.lstrip().startswith("#")]
    for first, last, comments in statements:
        line = ded[first]
        lead = line[:len(line) - len(line.lstrip())]
        if line.lstrip().startswith("#"):
            out.extend(pad + ln if ln.strip() else "\n" for ln in ded[first:last + 1])
            continue
        word = line.split()[0].rstrip(":")
        code = "".join(ded[first:last + 1])
        if word in _HEADERS:                  # keep the control flow: `# for t in range(N):`
            for _, c in comments:
                code = code.replace(c, "")
            head = f"{lead}# {' '.join(code.split())}"
            if not comments:
                out.append(pad + head + "\n")
                continue
        elif not comments:
            continue
        else:
            m = _TARGET.match(line.strip())
            head = (f"{lead}# {m['lhs'].strip()} {m['op']} ..." if m else
                    f"{lead}# {word} ..." if word in ("return", "yield") else f"{lead}# ...")
        col = comments[0][0]
        text = " ".join(c for _, c in comments)
        out.append(pad + (head.ljust(col) if len(head) < col else head + "  ") + text + "\n")
    out.append(f"{indent}# TODO({exercise_id}): write this part; `python -m tinymoe.grading check "
               f"{exercise_id}` tests it.\n")
    out.extend(f"{indent}#   {h}\n" for h in hint.splitlines())
    out.append(f'{indent}raise ExerciseNotDone("{exercise_id}")\n')
    return out


def _with_import(lines: List[str]) -> List[str]:
    """Add IMPORT_LINE after `from __future__ import ...` (or the module docstring) if absent."""
    if any(ln.strip() == IMPORT_LINE for ln in lines):
        return lines
    at = 0
    for i, ln in enumerate(lines):
        if ln.startswith("from __future__ import"):
            at = i + 1
    if at == 0:     # no future import: after the module docstring, if any
        text = "".join(lines)
        m = re.match(r'\s*(?:"""(?:.|\n)*?"""|\'\'\'(?:.|\n)*?\'\'\')[^\n]*\n', text)
        at = text[:m.end()].count("\n") if m else 0
    return lines[:at] + [IMPORT_LINE + "\n"] + lines[at:]


def strip_regions(text: str, ids: Iterable[str], hints: Dict[str, str],
                  source: str = "<text>") -> Tuple[str, int]:
    """Replace the bodies of every region whose id is in `ids` by its stub -> (text, regions)."""
    ids = set(ids)
    lines = text.splitlines(keepends=True)
    n = 0
    for r in reversed(find_regions(text, source)):
        if r.exercise_id in ids:
            lines[r.begin + 1:r.end] = stub_lines(lines[r.begin + 1:r.end], r.indent,
                                                  r.exercise_id, hints.get(r.exercise_id, ""))
            n += 1
    if n:
        lines = _with_import(lines)
    return "".join(lines), n


def splice_regions(dst: str, src: str, ids: Iterable[str], dst_name: str = "<dst>",
                   src_name: str = "<src>") -> Tuple[str, List[str]]:
    """Put src's region bodies into dst's regions of the same id (k-th region to k-th region).

    Returns (new dst text, ids whose region count differs between the two files: those regions
    of dst are left as they were).
    """
    ids = set(ids)
    d_regions, s_regions = find_regions(dst, dst_name), find_regions(src, src_name)
    d_lines, s_lines = dst.splitlines(keepends=True), src.splitlines(keepends=True)
    mismatched = sorted(i for i in ids if [r for r in d_regions if r.exercise_id == i] and
                        len([r for r in d_regions if r.exercise_id == i]) !=
                        len([r for r in s_regions if r.exercise_id == i]))
    pairs = []
    for i in ids - set(mismatched):
        pairs += zip([r for r in d_regions if r.exercise_id == i],
                     [r for r in s_regions if r.exercise_id == i])
    for d, s in sorted(pairs, key=lambda p: -p[0].begin):
        d_lines[d.begin + 1:d.end] = s_lines[s.begin + 1:s.end]
    if any("ExerciseNotDone(" in ln for ln in d_lines):
        d_lines = _with_import(d_lines)
    return "".join(d_lines), mismatched
