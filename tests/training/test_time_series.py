"""Time stacks and GSD in the model: 4D tokens, date and GSD encodings, tube masking, loss.

Expected values are computed here by hand from the formulas the docstrings cite (MAE's 1D
sin-cos, Scale-MAE's scaled grid), never by calling the code under test for them.
"""

from __future__ import annotations

import math

import pytest
import torch

from training.config import ConfigError, ModelConfig
from training.models.spectral_mae import (
    SpectralMAE,
    date_encoding,
    gsd_grid_encoding,
    load_official_state_dict,
    pos_table,
    sincos,
    tiny_config,
)


def _model(**kw: object) -> SpectralMAE:
    torch.manual_seed(0)
    return SpectralMAE(tiny_config(img_size=32, **kw))


def _stack(b: int, t: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 12, size, size, generator=torch.Generator().manual_seed(seed))


DATES = torch.tensor([[[2021.0, 100.0], [2021.0, 130.0], [2021.0, 160.0]]])


def test_4d_tokens_are_each_dates_3d_tokens_in_date_order() -> None:
    m = _model(num_dates=3)
    x = _stack(2, 3)
    tokens = m.patchify(x)
    per = m.cfg.tokens_per_date
    assert tokens.shape == (2, 3 * per, m.cfg.patch_dim)
    for t in range(3):
        assert torch.equal(tokens[:, t * per:(t + 1) * per], m.patchify(x[:, t]))
    assert torch.equal(m.unpatchify(tokens), x)  # round trip, exactly
    assert torch.equal(m.unpatchify(m.patchify(x[:, 0])), x[:, 0])  # one date keeps [B, 12, H, W]


def test_sincos_is_maes_formula() -> None:
    # dim 8: w = 10000 ** (-i / 4), i = 0..3
    got = sincos(torch.tensor([3.0]), 8)[0]
    w = [10000 ** (-i / 4) for i in range(4)]
    want = [math.sin(3 * x) for x in w] + [math.cos(3 * x) for x in w]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)


def test_a_one_day_shift_moves_only_the_day_of_year_half_by_the_formula() -> None:
    dim = 16  # 8 for the year, 8 for the day of year; w_i = 10000 ** (-i / 4)
    a = date_encoding(torch.tensor([[[2021.0, 100.0]]]), dim)[0, 0]
    b = date_encoding(torch.tensor([[[2021.0, 101.0]]]), dim)[0, 0]
    assert torch.equal(a[:8], b[:8])  # same year
    w = [10000 ** (-i / 4) for i in range(4)]
    want = [math.sin(101 * x) - math.sin(100 * x) for x in w] + [math.cos(101 * x) - math.cos(100 * x) for x in w]
    assert torch.allclose(b[8:] - a[8:], torch.tensor(want), atol=1e-6)
    assert (b[8:] - a[8:]).abs().max() > 0.5  # the fastest frequency turns by 1 radian a day


def test_the_model_adds_each_dates_encoding_scaled_to_its_tokens() -> None:
    m = _model(num_dates=3)
    d, per = m.cfg.embed_dim, m.cfg.tokens_per_date
    pos = m._positions(m.pos_embed_spatial, m.pos_embed_temporal, None, 3, DATES, None)
    assert pos.shape == (1, 3 * per, d)
    official = pos_table(m.pos_embed_spatial, m.pos_embed_temporal)[0]
    for t in range(3):
        year, doy = DATES[0, t].tolist()
        w = [10000 ** (-i / (d // 4)) for i in range(d // 4)]
        enc = ([math.sin(year * x) for x in w] + [math.cos(year * x) for x in w]
               + [math.sin(doy * x) for x in w] + [math.cos(doy * x) for x in w])
        want = official + 0.1 * torch.tensor(enc)
        assert torch.allclose(pos[0, t * per:(t + 1) * per], want, atol=1e-5)


def test_learned_date_tables_are_indexed_by_date_and_trained() -> None:
    m = _model(num_dates=2, date_encoding="learned")
    pos = m._positions(m.pos_embed_spatial, m.pos_embed_temporal, m.pos_embed_date, 2, None, None)
    per = m.cfg.tokens_per_date
    official = pos_table(m.pos_embed_spatial, m.pos_embed_temporal)[0]
    assert torch.allclose(pos[0, per:] - official, m.pos_embed_date[0, 1].expand(per, -1).detach())
    out = m(_stack(2, 2))  # no dates needed
    out.loss.backward()
    assert m.pos_embed_date.grad[0, :2].abs().sum() > 0 and m.pos_embed_date.grad[0, 2:].abs().sum() == 0
    assert m.decoder_pos_embed_date.grad[0, :2].abs().sum() > 0


def test_sincos_dates_are_required_for_a_stack() -> None:
    with pytest.raises(ValueError, match="acquisition dates"):
        _model(num_dates=3)(_stack(1, 3))


def test_gsd_encoding_places_tokens_at_ground_distance() -> None:
    d = 16
    # 20 m: token (r, c) sits where token (2r, 2c) sits at 10 m
    enc = gsd_grid_encoding(8, torch.tensor([2.0, 1.0]), d)  # [2, 64, 16], row-major tokens
    for r, c in ((0, 1), (1, 2), (3, 3)):
        assert torch.allclose(enc[0, r * 8 + c], enc[1, (2 * r) * 8 + 2 * c], atol=1e-6)
    # by hand: token (1, 2) at ratio 2 -> rows 2, cols 4; w = 10000 ** (-i / 4), i < 4
    w = [10000 ** (-i / 4) for i in range(4)]
    want = ([math.sin(2 * x) for x in w] + [math.cos(2 * x) for x in w]
            + [math.sin(4 * x) for x in w] + [math.cos(4 * x) for x in w])
    assert torch.allclose(enc[0, 1 * 8 + 2], torch.tensor(want), atol=1e-6)


def test_gsd_encoding_off_keeps_the_official_table_and_on_uses_the_samples_gsd() -> None:
    off, on = _model(), _model(gsd_encoding=True)
    official = pos_table(off.pos_embed_spatial, off.pos_embed_temporal)
    assert torch.equal(off._positions(off.pos_embed_spatial, off.pos_embed_temporal, None, 1, None,
                                      torch.tensor([20.0])), official)
    p10 = on._positions(on.pos_embed_spatial, on.pos_embed_temporal, None, 1, None, torch.tensor([10.0]))
    p20 = on._positions(on.pos_embed_spatial, on.pos_embed_temporal, None, 1, None, torch.tensor([20.0]))
    d, grid = on.cfg.embed_dim, on.cfg.grid_size
    per_pos = gsd_grid_encoding(grid, torch.tensor([2.0]), d)[0]  # by the tested function above
    assert torch.allclose(p20[0] - official[0], 0.1 * per_pos.repeat(on.cfg.num_groups, 1), atol=1e-6)
    assert not torch.allclose(p10, p20)


def test_tube_masking_hides_the_same_positions_at_every_date() -> None:
    m = _model(num_dates=3, masking="tube", mask_ratio=0.75)
    out = m(_stack(4, 3), dates=DATES.expand(4, -1, -1), generator=torch.Generator().manual_seed(5))
    per = m.cfg.tokens_per_date
    mask = out.mask.view(4, 3, per)
    assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[:, 0], mask[:, 2])
    kept = (1 - mask[:, 0]).sum(1)
    assert kept.tolist() == [int(per * 0.25)] * 4 == [m.cfg.num_visible // 3] * 4


def test_random_masking_over_4d_tokens_is_independent_per_date() -> None:
    m = _model(num_dates=3, mask_ratio=0.75)
    out = m(_stack(4, 3), dates=DATES.expand(4, -1, -1), generator=torch.Generator().manual_seed(5))
    n = m.cfg.num_tokens
    assert ((1 - out.mask).sum(1) == int(n * 0.25)).all() and m.cfg.num_visible == int(n * 0.25)
    mask = out.mask.view(4, 3, -1)
    assert not torch.equal(mask[:, 0], mask[:, 1])


def test_spectral_term_is_per_date_and_a_missing_date_is_left_out() -> None:
    m = _model(num_dates=2)
    c = m.cfg
    x = _stack(1, 2)
    pred = torch.randn(1, c.num_tokens, c.patch_dim, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, c.num_tokens)
    mask[0, ::3] = 1
    _, lt, ls = m.forward_loss(x, pred, mask)
    # by hand: per date, sum tokens over the 4 groups (values of group g at position l)
    tgt, prd = m.patchify(x).view(2, 4, c.num_spatial, -1), pred.view(2, 4, c.num_spatial, -1)
    want_ls = sum(((prd[t].sum(0) - tgt[t].sum(0)) ** 2).mean() for t in range(2)) / 2
    sq = ((pred - m.patchify(x)) ** 2).mean(-1)
    assert torch.allclose(ls, want_ls) and torch.allclose(lt, (sq * mask).sum() / mask.sum())
    # the second date missing: garbage there changes nothing, and the result is date 0's alone
    valid = torch.tensor([[1.0, 0.0]])
    garbage = pred.clone()
    garbage[0, c.tokens_per_date:] = 1e6
    _, lt0, ls0 = m.forward_loss(x, garbage, mask, valid)
    per = c.tokens_per_date
    assert torch.allclose(ls0, ((prd[0].sum(0) - tgt[0].sum(0)) ** 2).mean())
    assert torch.allclose(lt0, (sq[:, :per] * mask[:, :per]).sum() / mask[:, :per].sum())


def test_single_date_model_is_unchanged_by_the_new_options() -> None:
    """T = 1 with the GSD encoding off: the same numbers as the plain model, whatever the
    date options (dates have nothing to add to one date)."""
    x = torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(9))
    outs = []
    for kw in ({}, {"date_encoding": "none"}, {"masking": "tube"}, {"date_encoding": "sincos"}):
        outs.append(_model(**kw)(x, generator=torch.Generator().manual_seed(1)))
    for o in outs[1:]:
        assert torch.equal(o.loss, outs[0].loss) and torch.equal(o.mask, outs[0].mask)


def test_official_weights_load_into_a_learned_date_model_with_fresh_tables() -> None:
    plain = _model()
    learned = _model(num_dates=2, date_encoding="learned")
    fresh = learned.pos_embed_date.detach().clone()
    load_official_state_dict(learned, {"model": plain.state_dict()})
    assert torch.equal(learned.pos_embed_spatial, plain.pos_embed_spatial)
    assert torch.equal(learned.pos_embed_date, fresh)
    assert 0.01 < fresh.std().item() < 0.03  # trunc-normal(0.02), as documented
    assert "pos_embed_date" not in plain.state_dict()  # the default state dict is the official one


@pytest.mark.parametrize(("kw", "needle"), [
    ({"num_dates": 0}, "num_dates"),
    ({"num_dates": 20, "date_encoding": "learned"}, "max_dates"),
    ({"reference_gsd": 0.0}, "reference_gsd"),
])
def test_bad_time_options_are_refused(kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**kw)


@pytest.mark.parametrize("encoding", ["sincos", "learned"])
def test_the_evaluation_encoder_takes_stacks_as_pretraining_saw_them(encoding: str) -> None:
    """Unmasked, the evaluation encoder equals the pretraining encoder with nothing removed
    (its tokens put back in order); features pool over tokens and dates."""
    from training.evaluation.heads import Classifier, Encoder, pool

    m = _model(num_dates=3, date_encoding=encoding).eval()
    x, dates = _stack(2, 3), DATES.expand(2, -1, -1)
    with torch.no_grad():
        latent, _, ids_restore = m.forward_encoder(x, 0.0, torch.Generator().manual_seed(0), dates=dates)
        in_order = torch.gather(latent, 1, ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
        enc = Encoder(m)
        tokens = enc(x, dates)
    assert tokens.shape == (2, 3, m.cfg.num_groups, m.cfg.num_spatial, m.cfg.embed_dim)
    assert torch.allclose(tokens.reshape(2, -1, m.cfg.embed_dim), in_order, atol=1e-5)
    head = Classifier(enc, 5, probe=True)
    assert torch.allclose(head.features(x) if encoding == "learned" else pool(tokens),
                          tokens.mean(dim=(1, 2, 3)), atol=1e-6)


def test_the_evaluation_encoder_without_dates_encodes_each_date_alone() -> None:
    from training.evaluation.heads import Encoder

    m = _model(num_dates=3).eval()
    x = _stack(2, 3)
    with torch.no_grad():
        tokens = Encoder(m)(x)
        for t in range(3):
            assert torch.allclose(tokens[:, t], Encoder(m)(x[:, t]), atol=1e-6)
