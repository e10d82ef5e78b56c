"""openlora_kernels.patterns: the same yes/no answers as Python's re on the supported subset, in
linear time (no backtracking), and a PatternError naming the pattern for everything else."""
import re
import time

import pytest
from hypothesis import given, settings, strategies as st

from openlora_kernels.patterns import (MAX_PATTERN_LENGTH, MAX_STATES, Pattern, PatternError, compile_pattern,
                                       peft_key_matches)


def agree(pattern, s):
    p = compile_pattern(pattern)
    assert p.fullmatch(s) == bool(re.fullmatch(pattern, s)), (pattern, s, "fullmatch")
    assert p.match(s) == bool(re.match(pattern, s)), (pattern, s, "match")
    assert peft_key_matches(pattern, s) == bool(re.match(rf"(.*\.)?({pattern})$", s)), (pattern, s, "peft")


HAND = [
    r"q_proj", r"q_proj|v_proj", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", r"layers\.[0-3]\..*",
    r".*\.mlp\..*_proj", r"(?:up|down)_proj", r"layers\.1[0-9]?\.mlp", r"[^.]+_proj", r"[a-c\d_]+",
    r"\w+\.\W", r"\s*x\S", r"a{2}", r"a{2,3}", r"a{2,}", r"a{,2}b", r"a*?b+?c??", r"(a|b){1,3}?c",
    r"^q_proj", r"q_proj$", r"\Aq", r"q\Z", r"a$\n", r"\bq_proj\b", r"x\Bq", r"(?:)", r"", r"()*", r"(a*)*",
    r"(a|)+b", r"(?:a?){3}a{3}", r"[\]\-^]", r"[^\d\s]+", r".", r"(?P<n>a)b", r"(?#note)a",
]
STRINGS = ["", "a", "aa", "aaa", "aab", "b", "q_proj", "model.layers.12.self_attn.q_proj", "x.q_proj",
           "xq_proj", "model.layers.0.mlp.up_proj", "layers.15.mlp", "a\n", "q\n", "x q", "ab_1", "x.\n", "٣", "é"]


@pytest.mark.parametrize("pattern", HAND)
def test_hand_written_patterns_agree_with_re(pattern):
    for s in STRINGS:
        agree(pattern, s)


def _repeat(x):
    return st.sampled_from(["*", "+", "?", "*?", "+?", "??", "{2}", "{0,2}", "{1,3}", "{2,}", "{,1}", "{1,2}?"]).map(
        lambda q: f"(?:{x}){q}" if len(x) > 1 else x + q)


ATOMS = st.sampled_from(["a", "b", r"\.", ".", "[ab]", "[^a]", "[a-b.]", r"\d", r"\w", r"\s", r"\W", r"[\d.]",
                         "^", "$", r"\A", r"\Z", r"\b", r"\B", "_", "1"])
PATTERNS = st.recursive(
    ATOMS,
    lambda inner: st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map("|".join),
        inner.map(lambda x: f"({x})"),
        inner.map(lambda x: f"(?:{x})"),
        inner.flatmap(_repeat),
    ),
    max_leaves=8,
)


@settings(max_examples=600, deadline=None)
@given(PATTERNS, st.lists(st.text(alphabet="ab.1 _\n", max_size=8), min_size=1, max_size=6))
def test_generated_patterns_agree_with_re(pattern, strings):
    try:
        re.compile(pattern)
    except re.error:
        with pytest.raises(PatternError, match=re.escape(repr(pattern))):
            compile_pattern(pattern)
        return
    try:
        compile_pattern(pattern)
    except PatternError as e:                      # nested {m,n} repeats can pass the state limit
        assert "NFA states" in str(e)
        return
    for s in strings:
        agree(pattern, s)


@settings(max_examples=300, deadline=None)
@given(st.characters(), st.sampled_from([r"\d", r"\D", r"\w", r"\W", r"\s", r"\S", r"\b", r"\B", r"[\w.]", "."]))
def test_unicode_categories_agree_with_re(c, pattern):
    for s in (c, "a" + c, c + "a"):
        p = compile_pattern(pattern)
        assert p.match(s) == bool(re.match(pattern, s)), (pattern, s)
        assert p.fullmatch(s) == bool(re.fullmatch(pattern, s)), (pattern, s)


@pytest.mark.parametrize("pattern,s,want", [
    ("(.*.*)*X", "a" * 20000, False),
    ("(a|a)*b", "a" * 20000, False),
    ("(a*)*$", "a" * 20000 + "b", False),
    ("(a*)*b", "a" * 20000, False),
    ("(x+x+)+y", "x" * 20000, False),
    ("(.*.*)*X", "a" * 20000 + "X", True),
])
def test_patterns_that_make_re_backtrack_run_in_linear_time(pattern, s, want):
    """re backtracks exponentially on these (it would not finish); ours is linear in the input:
    4x the input takes about 4x the time (best of 3 each, so a loaded machine does not decide),
    well under the 16x of a quadratic matcher."""
    assert compile_pattern(pattern).fullmatch(s) is want
    assert peft_key_matches(pattern, "model.layers.0." + s) is want
    quarter = s[:len(s) // 4] + s[len(s) - (len(s) > 20000):]     # same ending (the "X" / "b" case)

    def best(text):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            compile_pattern(pattern).fullmatch(text)
            times.append(time.perf_counter() - t0)
        return min(times)

    small, big = best(quarter), best(s)
    assert big < 10 * small + 0.02, f"{pattern!r}: {big:.3f} s for {len(s)} chars, {small:.3f} s for {len(quarter)}"


@pytest.mark.parametrize("pattern,why", [
    ("(", "invalid regular expression"),
    ("a{3,1}", "invalid regular expression"),
    (r"(a)\1", "backreferences"),
    (r"(?P<x>a)(?P=x)", "backreferences"),
    ("(?=a)a", "lookarounds"),
    ("(?!a)b", "lookarounds"),
    ("(?<=a)b", "lookarounds"),
    ("(?<!a)b", "lookarounds"),
    ("(a)?(?(1)b|c)", "conditionals"),
    ("a*+", "possessive"),
    ("a{1,3}+", "possessive"),
    ("(?>a*)", "atomic"),
    ("(?i)q_proj", "inline flags"),
    ("(?s).", "inline flags"),
    ("(?x)a b", "inline flags"),
    ("(?m)^a", "inline flags"),
    ("(?i:q)_proj", "inline flags"),
    ("(?-i:q)", "inline flags"),
    ("a" * (MAX_PATTERN_LENGTH + 1), "characters, above the limit"),
    (f"a{{{MAX_STATES + 1}}}", "NFA states"),
    ("(a{100}){200}", "NFA states"),
    ("(" * 500 + ")" * 500, "nested too deeply"),
])
def test_refused_features_name_the_pattern(pattern, why):
    t0 = time.perf_counter()
    for f in (compile_pattern, lambda p: peft_key_matches(p, "model.q_proj")):
        with pytest.raises(PatternError, match=re.escape(repr(pattern[:120])) + r".*" + re.escape(why)):
            f(pattern)
    # refused before any blow-up: building (a{100}){200}'s automaton, or matching it, would take
    # far longer (a generous bound, so that a loaded machine does not decide)
    assert time.perf_counter() - t0 < 5.0
    assert issubclass(PatternError, ValueError)


def test_limits_themselves_are_accepted():
    assert compile_pattern("a" * MAX_PATTERN_LENGTH).fullmatch("a" * MAX_PATTERN_LENGTH)
    assert not compile_pattern("a" * MAX_PATTERN_LENGTH).fullmatch("a" * (MAX_PATTERN_LENGTH - 1))
    p = compile_pattern(f"a{{{MAX_STATES - 1}}}")
    assert p.num_states == MAX_STATES
    assert p.fullmatch("a" * (MAX_STATES - 1)) and not p.fullmatch("a" * MAX_STATES)
    t0 = time.perf_counter()
    assert compile_pattern("(?:){1000000000}b").fullmatch("b")          # an empty item repeated: 2 states
    assert time.perf_counter() - t0 < 5.0                                # (a billion copies: hours)


def test_types_and_cache():
    assert compile_pattern("q_proj") is compile_pattern("q_proj")
    assert isinstance(compile_pattern("q_proj"), Pattern)
    with pytest.raises(PatternError, match="expected a str"):
        compile_pattern(b"q_proj")
    with pytest.raises(PatternError, match="expected a str"):
        peft_key_matches(["q_proj"], "q_proj")
    with pytest.raises(TypeError, match="expected a str to match"):
        compile_pattern("q").fullmatch(None)


def test_peft_rule_on_module_names():
    name = "base_model.model.model.layers.3.self_attn.q_proj"
    assert peft_key_matches("q_proj", name)
    assert peft_key_matches("layers.3.self_attn.q_proj", name)
    assert peft_key_matches(r"layers\.\d\.self_attn\.q_proj", name)
    assert not peft_key_matches("_proj", name)                     # a suffix only after a dot
    assert not peft_key_matches("q_pro", name)                     # the end of the name
    assert not peft_key_matches("^q_proj", name)                   # ^ only at the start of the name
    assert peft_key_matches("^q_proj", "q_proj")
    assert peft_key_matches("k_proj|q_proj", name)
