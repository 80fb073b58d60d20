"""A group's pooled embeddings reach the interaction as one block: the same model as one
tensor per feature, and keys a sharded collection puts out of order are put back."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedTensor

from modules.model import pooled_block
from tests.helpers import TINY, compose_config
from train.build import build_click_model, feature_groups, init_tables
from train.data import planted_data


def test_pooled_block_is_the_values_when_keys_are_in_order():
    values = torch.randn(4, 6)
    pooled = KeyedTensor(keys=["a", "b", "c"], length_per_key=[2, 3, 1], values=values)
    assert pooled_block(pooled, ["a", "b", "c"]) is values


def test_pooled_block_puts_out_of_order_keys_back_in_feature_order_both_ways():
    values = torch.randn(4, 6, requires_grad=True)
    # As a sharded collection may put them: "c" (dim 1) first, then "a" (2), then "b" (3).
    pooled = KeyedTensor(keys=["c", "a", "b"], length_per_key=[1, 2, 3], values=values)
    block = pooled_block(pooled, ["a", "b", "c"])
    expected = torch.cat([values[:, 1:3], values[:, 3:6], values[:, 0:1]], dim=1)
    torch.testing.assert_close(block, expected, rtol=0, atol=0)
    weights = torch.arange(24, dtype=torch.float32).view(4, 6)
    (block * weights).sum().backward()
    # Each column's gradient is the weight of the place it moved to.
    expected_grad = torch.cat([weights[:, 5:6], weights[:, 0:2], weights[:, 2:5]], dim=1)
    torch.testing.assert_close(values.grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["dlrm", "dcn"])
@pytest.mark.parametrize("hashing", ["default", "multi_hash"])
def test_blocks_and_per_feature_pieces_give_the_same_model(model, hashing):
    overrides = [*TINY, f"model={model}", f"hashing={hashing}", "model.dcn_low_rank_dim=8"]
    if model == "dcn":
        overrides += ["model.dense_layer_sizes=[16,8]", "model.over_layer_sizes=[16,1]"]
    config = compose_config(overrides)
    groups = feature_groups(config.features, config.hashing)
    batch, _ = planted_data(config, groups).batch("train", 0, 0)

    def logits_and_grads(one_block: bool):
        model = build_click_model(config, groups, torch.device("cpu"))
        init_tables(model, groups, config.trainer.seed)
        blocks = []
        for group in model.model.embedding_groups.values():
            blocks.append(group.one_block)
            group.one_block = group.one_block and one_block
        loss, (_, logits, _) = model(batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, blocks

    block_logits, block_grads, used = logits_and_grads(True)
    piece_logits, piece_grads, _ = logits_and_grads(False)
    # Plain hashing: every group is a block; multi-hash sums probes per feature, so no group is.
    assert all(used) if hashing == "default" else not any(used)
    torch.testing.assert_close(block_logits, piece_logits, rtol=1e-6, atol=1e-6)
    assert block_grads.keys() == piece_grads.keys() and len(block_grads) > 0
    for name in block_grads:
        torch.testing.assert_close(block_grads[name], piece_grads[name], rtol=1e-5, atol=1e-6,
                                   msg=name)
