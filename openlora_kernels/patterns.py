"""Regular-expression matching in linear time, for the module-name patterns of adapter configs.

PEFT matches ``rank_pattern`` / ``alpha_pattern`` keys against module names with
``re.match(rf"(.*\\.)?({key})$", module)``. Python's ``re`` backtracks, so a key such as
``"(.*.*)*X"`` takes exponential time on a long name: a config file could hang the process. Here
a pattern is parsed by Python's own regex parser (so the syntax is exactly ``re``'s), compiled to
a Thompson NFA and simulated over the string with a set of states: time O(len(string) * states),
never backtracking.

Supported: literals, ``.``, character classes (ranges, negation, ``\\d \\w \\s`` and their
negations, Unicode semantics like ``re``), alternation, groups (capturing or not), greedy and lazy
repeats ``* + ? {m,n}`` (lazy repeats accept the same strings), anchors ``^ $ \\A \\Z`` and word
boundaries ``\\b \\B`` (no MULTILINE / DOTALL: ``$`` also matches before a final newline, ``.``
does not match a newline, like ``re`` without flags).

Refused with :class:`PatternError` naming the pattern: invalid syntax, backreferences,
lookarounds, conditionals, possessive repeats and atomic groups (they change which strings
match), inline flags, patterns longer than :data:`MAX_PATTERN_LENGTH` characters, nesting too
deep for the parser, and NFAs above :data:`MAX_STATES` states (``{m,n}`` repeats are expanded).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

try:                                   # Python 3.11+
    import re._parser as _sre
except ImportError:                    # pragma: no cover - Python < 3.11
    import sre_parse as _sre
import re

MAX_PATTERN_LENGTH = 1000
MAX_STATES = 10000

_C = _sre                              # the opcode / category constants live in the parser module
_POSSESSIVE = getattr(_C, "POSSESSIVE_REPEAT", None)
_ATOMIC = getattr(_C, "ATOMIC_GROUP", None)
_REFUSED = {_C.GROUPREF: "backreferences", _C.GROUPREF_EXISTS: "conditionals (?(group)...)",
            _C.ASSERT: "lookarounds", _C.ASSERT_NOT: "lookarounds",
            _POSSESSIVE: "possessive repeats", _ATOMIC: "atomic groups (?>...)"}
_REFUSED.pop(None, None)


class PatternError(ValueError):
    """A pattern this matcher refuses (the message names the pattern and why)."""


def _show(pattern: str) -> str:
    """The pattern for a message (a long one shortened)."""
    return repr(pattern) if len(pattern) <= 120 else repr(pattern[:120]) + "..."


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


_CATEGORIES = {
    _C.CATEGORY_DIGIT: str.isdecimal, _C.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    _C.CATEGORY_SPACE: str.isspace, _C.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
    _C.CATEGORY_WORD: _is_word, _C.CATEGORY_NOT_WORD: lambda c: not _is_word(c),
}

_NON_BOUNDARY_IN_EMPTY = re.match(r"\B", "") is not None

# State kinds. A CHAR state consumes one character accepted by its test; the others are epsilon.
_CHAR, _SPLIT, _AT, _MATCH = range(4)


def _class_test(items, pattern: str):
    """A predicate for the items of an IN opcode (a character class)."""
    negate, chars, ranges, cats = False, set(), [], []
    for op, av in items:
        if op is _C.NEGATE:
            negate = True
        elif op is _C.LITERAL:
            chars.add(chr(av))
        elif op is _C.RANGE:
            ranges.append((av[0], av[1]))
        elif op is _C.CATEGORY and av in _CATEGORIES:
            cats.append(_CATEGORIES[av])
        else:
            raise PatternError(f"pattern {_show(pattern)}: unsupported character class item {op} {av}")
    chars = frozenset(chars)

    def test(c: str) -> bool:
        hit = c in chars or any(lo <= ord(c) <= hi for lo, hi in ranges) or any(f(c) for f in cats)
        return hit != negate
    return test


_ANCHORS = (_C.AT_BEGINNING, _C.AT_BEGINNING_STRING, _C.AT_END, _C.AT_END_STRING, _C.AT_BOUNDARY,
            _C.AT_NON_BOUNDARY)


class _Builder:
    """Compiles an opcode tree to an NFA, back to front: each node is built with its successor."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.kind: List[int] = []
        self.arg: List[object] = []
        self.out: List[List[int]] = []

    def new(self, kind: int, arg=None, out=()) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternError(f"pattern {_show(self.pattern)}: needs more than {MAX_STATES} NFA states "
                               "(large {m,n} repeats?)")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(list(out))
        return len(self.kind) - 1

    def seq(self, items, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self.item(op, av, nxt)
        return nxt

    def item(self, op, av, nxt: int) -> int:
        p = self.pattern
        if op in _REFUSED:
            raise PatternError(f"pattern {_show(p)}: {_REFUSED[op]} are not supported")
        if op is _C.LITERAL:
            return self.new(_CHAR, chr(av).__eq__, [nxt])
        if op is _C.NOT_LITERAL:
            return self.new(_CHAR, chr(av).__ne__, [nxt])
        if op is _C.ANY:
            return self.new(_CHAR, "\n".__ne__, [nxt])
        if op is _C.IN:
            return self.new(_CHAR, _class_test(av, p), [nxt])
        if op is _C.AT:
            if av not in _ANCHORS:
                raise PatternError(f"pattern {_show(p)}: anchor {av} is not supported")
            return self.new(_AT, av, [nxt])
        if op is _C.BRANCH:
            return self.new(_SPLIT, None, [self.seq(alt, nxt) for alt in av[1]])
        if op is _C.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError(f"pattern {_show(p)}: inline flags (?flags:...) are not supported")
            return self.seq(sub, nxt)
        if op is _C.MAX_REPEAT or op is _C.MIN_REPEAT:    # lazy or greedy: the same strings match
            lo, hi, sub = av
            if hi == _C.MAXREPEAT:
                loop = self.new(_SPLIT)
                self.out[loop] = [self.seq(sub, loop), nxt]
                nxt = loop
            else:
                for _ in range(hi - lo):
                    nxt = self.new(_SPLIT, None, [self.seq(sub, nxt), nxt])
            for _ in range(lo):
                before = len(self.kind)
                nxt = self.seq(sub, nxt)
                if len(self.kind) == before:            # an empty item: one copy or a million
                    break
            return nxt
        raise PatternError(f"pattern {_show(p)}: {op} is not supported")


class Pattern:
    """A compiled pattern: :meth:`fullmatch` and :meth:`match` answer like ``re``'s, yes or no.

    ``peft_suffix=True`` compiles PEFT's ``rf"(.*\\.)?({pattern})$"`` around ``pattern`` instead
    (messages and the length limit still concern ``pattern``).
    """

    def __init__(self, pattern: str, *, peft_suffix: bool = False):
        if not isinstance(pattern, str):
            raise PatternError(f"pattern {pattern!r}: expected a str, got {type(pattern).__name__}")
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise PatternError(f"pattern {_show(pattern)}: {len(pattern)} characters, above the limit of "
                               f"{MAX_PATTERN_LENGTH}")
        self.pattern, self.peft_suffix = pattern, peft_suffix
        try:
            tree = _sre.parse(pattern)
        except re.error as e:
            raise PatternError(f"pattern {_show(pattern)}: invalid regular expression ({e})") from None
        except RecursionError:
            raise PatternError(f"pattern {_show(pattern)}: groups nested too deeply") from None
        if tree.state.flags & ~re.UNICODE:
            raise PatternError(f"pattern {_show(pattern)}: inline flags (?flags) are not supported")
        b = _Builder(pattern)
        end = b.new(_MATCH)
        try:
            if not peft_suffix:
                self._start = b.seq(tree, end)
            else:                                   # (.*\.)?(pattern)$
                body = b.seq(tree, b.new(_AT, _C.AT_END, [end]))
                loop = b.new(_SPLIT)
                b.out[loop] = [b.new(_CHAR, "\n".__ne__, [loop]), b.new(_CHAR, ".".__eq__, [body])]
                self._start = b.new(_SPLIT, None, [loop, body])
        except RecursionError:
            raise PatternError(f"pattern {_show(pattern)}: groups nested too deeply") from None
        self._kind, self._arg, self._out = b.kind, b.arg, b.out
        self.num_states = len(b.kind)

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r})"

    def _at(self, where, s: str, i: int) -> bool:
        n = len(s)
        if where is _C.AT_BEGINNING or where is _C.AT_BEGINNING_STRING:
            return i == 0
        if where is _C.AT_END:
            return i == n or (i == n - 1 and s[i] == "\n")
        if where is _C.AT_END_STRING:
            return i == n
        if n == 0:                  # re: \b never matches an empty string, \B only from Python 3.14
            return where is _C.AT_NON_BOUNDARY and _NON_BOUNDARY_IN_EMPTY
        before = i > 0 and _is_word(s[i - 1])
        after = i < n and _is_word(s[i])
        return (before != after) if where is _C.AT_BOUNDARY else (before == after)   # \b, \B

    def _closure(self, starts, s: str, i: int) -> Dict[int, None]:
        """The CHAR / MATCH states reachable from ``starts`` without consuming input at ``i``."""
        kind, out = self._kind, self._out
        seen, found, stack = set(starts), {}, list(starts)
        while stack:
            q = stack.pop()
            k = kind[q]
            if k == _CHAR or k == _MATCH:
                found[q] = None
                continue
            if k == _AT and not self._at(self._arg[q], s, i):
                continue
            for r in out[q]:
                if r not in seen:
                    seen.add(r)
                    stack.append(r)
        return found

    def _run(self, s: str, prefix: bool) -> bool:
        if not isinstance(s, str):
            raise TypeError(f"pattern {_show(self.pattern)}: expected a str to match, got {type(s).__name__}")
        kind, arg, out = self._kind, self._arg, self._out
        cur = self._closure([self._start], s, 0)
        for i, c in enumerate(s):
            if prefix and any(kind[q] == _MATCH for q in cur):
                return True
            nxt = [out[q][0] for q in cur if kind[q] == _CHAR and arg[q](c)]
            if not nxt:
                return False
            cur = self._closure(nxt, s, i + 1)
        return any(kind[q] == _MATCH for q in cur)

    def fullmatch(self, s: str) -> bool:
        """``bool(re.fullmatch(pattern, s))``."""
        return self._run(s, prefix=False)

    def match(self, s: str) -> bool:
        """``bool(re.match(pattern, s))``: a match starting at the beginning of ``s``."""
        return self._run(s, prefix=True)


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str, peft_suffix: bool) -> Pattern:
    return Pattern(pattern, peft_suffix=peft_suffix)


def compile_pattern(pattern: str, *, peft_suffix: bool = False) -> Pattern:
    """A compiled :class:`Pattern` (cached); raises PatternError for what is not supported."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern {pattern!r}: expected a str, got {type(pattern).__name__}")
    return _compile(pattern, bool(peft_suffix))


def peft_key_matches(key: str, module: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule, ``bool(re.match(rf"(.*\\.)?({key})$", module))``:
    ``key`` matches the whole module name or a suffix after a dot. Raises PatternError for a key
    :func:`compile_pattern` refuses."""
    return compile_pattern(key, peft_suffix=True).match(module)
