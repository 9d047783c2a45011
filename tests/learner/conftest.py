import pytest
import torch


def make_batch(n=8, seed=0, vocab=100, group_size=4, lp=-4.6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, vocab, (3 + i % 4,), generator=g).tolist()
        c = torch.randint(4, vocab, (2 + i % 5,), generator=g).tolist()
        out.append(dict(prompt_ids=p, completion_ids=c, logprobs=[lp] * len(c),
                        reward=float((i * 7) % 3), group_id=f"g{i // group_size}"))
    return out


@pytest.fixture
def batch():
    return make_batch()


@pytest.fixture(name="make_batch")
def make_batch_fixture():
    return make_batch
