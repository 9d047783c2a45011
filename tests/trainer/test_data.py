"""Datasets: files (JSONL, verl layout), bad rows, synthetic tasks, the resumable cursor."""

import json

import pytest

from covrl.config import DataConfig
from covrl.data import DataError, PromptSampler, build_dataset, encode_prompt, load_file, synthetic
from covrl.models import char_tokenizer


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_verl_layout_and_plain_rows(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "reward_model": {"ground_truth": "4"},
         "data_source": "arithmetic"},
        {"prompt": "What is 3+3?", "ground_truth": 6},
    ]
    path = _write(tmp_path / "d.jsonl", rows)
    ex, skipped, _ = load_file(path, DataConfig(task="file", train_path=path), "math")
    assert skipped == 0 and len(ex) == 2
    assert ex[0].task == "arithmetic" and ex[0].ground_truth == "4"
    assert ex[0].messages() == [{"role": "user", "content": "What is 2+2?"}]
    assert ex[1].task == "math" and ex[1].ground_truth == "6"
    ids = encode_prompt(ex[0], char_tokenizer(), DataConfig())
    assert char_tokenizer().decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"prompt": "hi"', "not valid JSON"),
        ({"question": "hi", "ground_truth": "1"}, "field 'prompt' is missing"),
        ({"prompt": [{"role": "user"}], "ground_truth": "1"}, "field 'prompt[0]'"),
        ({"prompt": "hi"}, "field 'ground_truth' is missing"),
        ({"prompt": "hi", "ground_truth": ""}, "expected a non-empty string"),
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path, bad, needle):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "ok", "ground_truth": "1"}, bad])
    cfg = DataConfig(task="file", train_path=path)
    with pytest.raises(DataError) as e:
        load_file(path, cfg, "math")
    assert f"{path}:2" in str(e.value) and needle in str(e.value)


def test_bad_rows_skipped_and_counted(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "ground_truth": "1"}, {"prompt": "b"}, "{",
                                         {"prompt": "c", "ground_truth": "2"}])
    cfg = DataConfig(task="file", train_path=path, on_bad_row="skip", eval_size=1)
    ds = build_dataset(cfg, "math")
    assert ds.skipped == 2 and len(ds.train) + len(ds.eval) == 2
    assert ":2" in ds.skipped_reasons[0]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="needs pyarrow"):
        load_file(str(p), DataConfig(task="file", train_path=str(p)), "math")


def test_parquet_in_verl_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "reward_model": {"ground_truth": "4"},
         "data_source": "arithmetic"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7*6?"}],
         "reward_model": {"ground_truth": "42"}, "data_source": "arithmetic"},
    ]
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    ex, skipped, _ = load_file(path, DataConfig(task="file", train_path=path), "math")
    assert skipped == 0 and [e.ground_truth for e in ex] == ["4", "42"]
    assert ex[1].messages()[0] == {"role": "system", "content": "Be brief."}
    assert all(e.task == "arithmetic" for e in ex)


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_synthetic_is_seeded_with_disjoint_held_out(task):
    cfg = DataConfig(task=task, train_size=50, eval_size=10, seed=3)
    tr, ho = synthetic(cfg)
    tr2, ho2 = synthetic(cfg)
    assert [e.prompt for e in tr] == [e.prompt for e in tr2] and len(ho) == 10
    assert not {e.prompt for e in tr} & {e.prompt for e in ho}
    assert [e.prompt for e in synthetic(DataConfig(task=task, train_size=50, eval_size=10, seed=4))[0]] != [
        e.prompt for e in tr]


def test_synthetic_answers_verify():
    from covrl.rewards import score_one

    for task in ("arithmetic", "countdown"):
        tr, _ = synthetic(DataConfig(task=task, train_size=5, eval_size=0))
        for e in tr:
            if task == "arithmetic":
                assert score_one(task, f"The answer is {e.ground_truth}", e.ground_truth, e.reward_meta)[1] == 1.0
            else:
                assert e.reward_meta["target"] == int(e.ground_truth)


def test_sampler_cursor_resumes_exactly():
    tr, _ = synthetic(DataConfig(train_size=10, eval_size=0))
    a = PromptSampler(tr, seed=1)
    a.next_batch(7)
    state = a.state_dict()
    rest_a = [e.uid for e in a.next_batch(9)]  # crosses an epoch boundary
    b = PromptSampler(tr, seed=1)
    b.load_state_dict(state)
    assert [e.uid for e in b.next_batch(9)] == rest_a
    with pytest.raises(DataError, match="does not match"):
        PromptSampler(tr[:5], seed=1).load_state_dict(state)
