"""compare.py's own logic (its runs are train_rl.py's, tested there): flags and the table by hand."""
import pytest

import compare
import config


def test_every_default_source_is_accepted_and_a_typo_is_not():
    cfg = compare.CompareConfig()
    compare.check_config(cfg)
    assert cfg.sources.split(",") == list(compare.SOURCES)
    with pytest.raises(config.ConfigError, match="--sources .*unknown \\['student_sofr'\\]"):
        compare.check_config(compare.CompareConfig(sources="teacher_binary,student_sofr"))
    with pytest.raises(config.ConfigError, match="--seeds"):
        compare.check_config(compare.CompareConfig(seeds="0,one"))


def test_table_by_hand():
    results = {"teacher_binary": [[(0, 0.5), (10, 0.75)], [(0, 0.25), (10, 0.5)]],
               "substring": [[(0, 0.5), (10, 0.0)], [(0, 0.25), (10, 0.25)]]}
    rows = compare.table(results).splitlines()[2:]
    assert rows == ["| teacher (rule:math), binary | 0.375 | 0.625 | +0.250 | 0.500 -> 0.750, 0.250 -> 0.500 |",
                    "| rule substring, binary | 0.375 | 0.125 | -0.250 | 0.500 -> 0.000, 0.250 -> 0.250 |"]
