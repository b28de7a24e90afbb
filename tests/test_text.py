"""Text data, the sentence VAE and its language-model baseline: exact checks on a small synthetic corpus."""
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyrovae.data import load_dataset
from pyrovae.guides import NoLatentGuide, SentenceEncoder
from pyrovae.models import RNNLM, SentenceVAE
from pyrovae.objectives import ELBO, GECO, IWAE, BetaELBO, LogVarianceLoss, Renyi, VarianceLoss
from pyrovae.objectives.sequence import AnnealedELBO, TokenGECO, observed_counts
from pyrovae.evaluate.text import evaluate_text, write_text_outputs
from pyrovae.data.text import BucketBatches, Sentences, Vocab, buckets, encode_corpus, limit_length, perplexity, unsort

CORPUS = [
    "the cat sat on the mat",
    "a dog ran",
    "the dog sat",
    "cats and dogs ran far away from the old mat today",
    "the mat",
    "a cat ran on the mat",
    "dogs sat",
    "the old cat sat on a mat and the dog ran away",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: small RNN steps are dominated by thread synchronisation on a shared CPU (30x slower
    with 2 threads under load on the 2-core development machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus():
    texts = [s.split() for s in CORPUS]
    vocab = Vocab.build(texts)
    return vocab, encode_corpus(texts, vocab)


def small_vae(vocab, word_dropout=0.0, rnn="lstm"):
    return SentenceVAE(len(vocab), z_dim=3, embed_dim=8, hidden_dim=12, rnn=rnn, word_dropout=word_dropout)


def small_encoder(vocab, bidirectional=True, rnn="lstm"):
    return SentenceEncoder(len(vocab), z_dim=3, embed_dim=8, hidden_dim=12, rnn=rnn, bidirectional=bidirectional)


# --- data ----------------------------------------------------------------------------------------


def test_vocab_and_padding_layout():
    vocab, data = corpus()
    assert vocab.itos[:4] == ["<pad>", "<sos>", "<eos>", "<unk>"]
    assert data.tokens.shape == (8, 13 + 1)  # longest: 12 words + <eos>, after <sos>
    for i, s in enumerate(CORPUS):
        n = len(s.split())
        assert int(data.lengths[i]) == n + 1
        row = data.tokens[i].tolist()
        assert row[0] == vocab.sos and row[n + 1] == vocab.eos and set(row[n + 2 :]) <= {vocab.pad}
        assert vocab.decode(row) == s
    assert vocab.encode(["zebra"]) == [vocab.unk]
    assert data.num_tokens == sum(len(s.split()) + 1 for s in CORPUS)
    assert Vocab.from_state_dict(vocab.state_dict()).itos == vocab.itos


def test_length_limit_cut_and_drop():
    texts = [["a"] * 3, ["b"] * 7, ["c"] * 5]
    cut, over = limit_length(texts, 5, "cut")
    assert over == 1 and [len(t) for t in cut] == [3, 5, 5]
    dropped, over = limit_length(texts, 5, "drop")
    assert over == 1 and [len(t) for t in dropped] == [3, 5]
    with pytest.raises(ValueError, match="overlong"):
        limit_length(texts, 5, "truncate")
    with pytest.raises(ValueError, match="max_length"):
        limit_length(texts, 0, "cut")


def test_bucket_batches_cover_every_sentence_once_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (203,), generator=g)
    texts = [[str(int(i % 7))] * int(n) for i, n in enumerate(lengths)]
    vocab = Vocab.build(texts)
    data = encode_corpus(texts, vocab)
    batches = BucketBatches(data, 16, pad_multiple=4, generator=g)
    perm = batches.permutation()
    assert sorted(perm.tolist()) == list(range(203))
    seen, padded = 0, 0
    for i in range(len(batches)):
        b = batches.batch(perm, i)
        width = b.tokens.shape[1] - 1
        assert width % 4 == 0 or width == data.tokens.shape[1] - 1
        assert width >= int(b.lengths.max()) and width - int(b.lengths.max()) < 4 + int(b.lengths.max() - b.lengths.min())
        # the batch holds exactly the rows of data it indexes, cut
        idx = perm[i * 16 : (i + 1) * 16]
        assert torch.equal(b.tokens, data.tokens[idx, : width + 1]) and torch.equal(b.lengths, data.lengths[idx])
        seen += b.num_sentences
        padded += b.num_sentences * width
    assert seen == 203
    # sorted buckets: padding far below padding to the global maximum
    assert padded < 0.6 * 203 * (data.tokens.shape[1] - 1)
    assert len({b.tokens.shape[1] for b in batches.epoch(perm)}) <= 11


def test_unsort_restores_order():
    vocab, data = corpus()
    values = torch.cat([b.lengths.float() for b in buckets(data, 3)])
    assert torch.equal(unsort(values, data), data.lengths.float())


# --- likelihood, masking, word dropout ------------------------------------------------------------


def direct_log_likelihood(model, tokens, lengths, z):
    """sum_t<len log softmax(logits)[target], computed without Pyro or masks, one sentence at a time."""
    out = []
    for i in range(tokens.shape[0]):
        n = int(lengths[i])
        logits, _ = model.decoder(tokens[i : i + 1, :n], None if z is None else z[i : i + 1])
        out.append(torch.log_softmax(logits[0], -1).gather(-1, tokens[i, 1 : n + 1, None]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_masked_log_likelihood_is_the_sum_over_unpadded_tokens(rnn):
    vocab, data = corpus()
    model = small_vae(vocab, rnn=rnn)
    z = torch.randn(8, 3)
    trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(*data)
    trace.compute_log_prob()
    got = trace.nodes["x"]["log_prob"]
    assert got.shape == (8,)
    torch.testing.assert_close(got, direct_log_likelihood(model, data.tokens, data.lengths, z), rtol=1e-5, atol=1e-4)
    lm = RNNLM(len(vocab), embed_dim=8, hidden_dim=12, rnn=rnn)
    trace = poutine.trace(lm).get_trace(*data)
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["x"]["log_prob"], direct_log_likelihood(lm, data.tokens, data.lengths, None), rtol=1e-5, atol=1e-4)


def scrambled_padding(data: Sentences, extra: int, vocab_size: int) -> Sentences:
    """The same sentences with ``extra`` more columns and random words wherever there is padding."""
    tokens = torch.cat([data.tokens, torch.zeros(data.num_sentences, extra, dtype=torch.long)], 1)
    pad = torch.arange(tokens.shape[1]) > data.lengths[:, None]
    noise = torch.randint(4, vocab_size, tokens.shape)
    return Sentences(torch.where(pad, noise, tokens), data.lengths)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("extra,word_dropout", [(0, 0.3), (5, 0.0)])  # dropout draws one number per input: same width, same draws
def test_padding_content_never_changes_any_loss(bidirectional, extra, word_dropout):
    vocab, data = corpus()
    other = scrambled_padding(data, extra, len(vocab))
    assert not torch.equal(other.tokens[:, : data.tokens.shape[1]], data.tokens)
    model, guide = small_vae(vocab, word_dropout=word_dropout), small_encoder(vocab, bidirectional)
    for objective in (ELBO(), IWAE(4), BetaELBO(0.5), AnnealedELBO(free_bits=0.1), TokenGECO(4.0), VarianceLoss(3)):
        losses = []
        for d in (data, other):
            pyro.set_rng_seed(3)
            losses.append(objective.differentiable_loss(model, guide, *d))
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(guide.features(*data), guide.features(*other), rtol=1e-6, atol=1e-6)


def test_word_dropout_replaces_inputs_never_targets():
    vocab, data = corpus()
    model = small_vae(vocab, word_dropout=1.0)
    seen = {}
    model.decoder.embed.register_forward_hook(lambda mod, args, out: seen.__setitem__("words", args[0]))
    trace = poutine.trace(model).get_trace(*data)
    assert torch.equal(trace.nodes["x"]["value"], data.tokens[:, 1:])  # targets untouched
    words = seen["words"]
    assert torch.all(words[:, 0] == vocab.sos) and torch.all(words[:, 1:] == vocab.unk)
    assert not torch.equal(data.tokens[:, 1:-1], words[:, 1:])
    # evaluation (no gradients, or eval mode) sees the full model: no dropout
    with torch.no_grad():
        poutine.trace(model).get_trace(*data)
    assert torch.equal(seen["words"], data.tokens[:, :-1])
    model.eval()
    poutine.trace(model).get_trace(*data)
    assert torch.equal(seen["words"], data.tokens[:, :-1])
    # p = 0.3: a fraction near 0.3 of the inputs after <sos> is replaced (binomial standard error)
    model = small_vae(vocab, word_dropout=0.3)
    model.decoder.embed.register_forward_hook(lambda mod, args, out: seen.__setitem__("words", args[0]))
    big = Sentences(data.tokens.repeat(200, 1), data.lengths.repeat(200))
    poutine.trace(model).get_trace(*big)
    known = big.tokens[:, 1:-1] != vocab.unk
    changed = (seen["words"][:, 1:] != big.tokens[:, 1:-1])[known]
    n = changed.numel()
    frac = changed.float().mean().item()
    assert torch.all(seen["words"][:, 1:][seen["words"][:, 1:] != big.tokens[:, 1:-1]] == vocab.unk)
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)


# --- perplexity and NLL against a hand computation ------------------------------------------------


def unigram_model(model, probs: torch.Tensor):
    """Make the decoder ignore its input and state: p(w_t | ...) = probs[w]."""
    with torch.no_grad():
        model.decoder.out.weight.zero_()
        model.decoder.out.bias.copy_(probs.log())
    return model


def test_perplexity_and_nll_agree_with_a_hand_computation():
    vocab, data = corpus()
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(len(vocab), generator=g) + 0.1
    probs /= probs.sum()
    hand = [-sum(math.log(probs[vocab.stoi[w]]) for w in s.split()) - math.log(probs[vocab.eos]) for s in CORPUS]
    tokens = sum(len(s.split()) + 1 for s in CORPUS)
    hand_ppl = math.exp(sum(hand) / tokens)
    assert perplexity(torch.tensor(hand), data.lengths) == pytest.approx(hand_ppl, rel=1e-6)

    lm = unigram_model(RNNLM(len(vocab), embed_dim=8, hidden_dim=12), probs)
    result = evaluate_text(lm, NoLatentGuide(), data, num_samples=3, batch_size=3)
    torch.testing.assert_close(result["nll_values"], torch.tensor(hand, dtype=torch.float32), rtol=1e-5, atol=1e-4)
    assert result["perplexity"] == pytest.approx(hand_ppl, rel=1e-5)
    assert result["num_tokens"] == tokens and result["kl"] == 0.0

    # a VAE whose decoder ignores z and whose guide is the prior: every importance weight is p(x), exactly
    vae = unigram_model(small_vae(vocab), probs)
    guide = small_encoder(vocab)
    with torch.no_grad():
        guide.head.weight.zero_()
        guide.head.bias.copy_(torch.cat([torch.zeros(3), torch.full((3,), math.log(math.e - 1))]))  # softplus -> 1
    result = evaluate_text(vae, guide, data, num_samples=7, batch_size=3)
    torch.testing.assert_close(result["nll_values"], torch.tensor(hand, dtype=torch.float32), rtol=1e-4, atol=1e-3)
    assert result["perplexity"] == pytest.approx(hand_ppl, rel=1e-4)
    assert result["nll_importance_stderr"] < 1e-3 and abs(result["kl"]) < 1e-3
    assert result["active_units"] == {"z": 0}


# --- active units: the library's estimator, by length bucket ---------------------------------------


def bag_of_words_model(vocab_size: int, z_dim: int = 2):
    """A hand-written Pyro program over (tokens, lengths): a bag-of-words decoder from z, masked per token."""
    decoder = torch.nn.Linear(z_dim, vocab_size)

    def model(tokens, lengths):
        pyro.module("bow_decoder", decoder)
        mask = torch.arange(tokens.shape[1] - 1) < lengths[:, None]
        with pyro.plate("data", tokens.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(tokens.shape[0], z_dim), 1.0).to_event(1))
            logits = decoder(z).unsqueeze(-2).expand(*z.shape[:-1], tokens.shape[1] - 1, vocab_size)
            pyro.sample("x", dist.Categorical(logits=logits).mask(mask).to_event(1), obs=tokens[:, 1:])

    return model


def test_text_active_units_are_the_library_estimator_over_buckets():
    """evaluate_text counts active units with pyrovae.evaluate's estimator, bucket by bucket: the same activities
    as unit_activity over all sentences at once (the encoder reads no padding), the same count as active_units."""
    from pyrovae.evaluate import active_units, batched_unit_activity, unit_activity

    vocab, data = corpus()
    vae, guide = small_vae(vocab), small_encoder(vocab)
    with torch.no_grad():  # unit 0's mean moves a lot with the sentence, unit 2's not at all
        guide.head.weight[0] *= 50
        guide.head.weight[2] = 0
    vae.eval(), guide.eval()
    per_bucket = batched_unit_activity(guide, [tuple(b) for b in buckets(data, 3)])
    whole = unit_activity(guide, tuple(data))
    assert per_bucket["z"].exact and whole["z"].exact
    torch.testing.assert_close(per_bucket["z"].variance, whole["z"].variance, rtol=1e-5, atol=1e-7)
    assert whole["z"].variance[0] > 0.1 and whole["z"].variance[2] == 0
    counted = evaluate_text(vae, guide, data, num_samples=2, batch_size=3)["active_units"]
    assert counted == active_units(guide, tuple(data)) == {"z": int((whole["z"].variance > 1e-2).sum())}


def test_text_active_units_subtract_the_sampling_variance_of_a_sampled_mean():
    """A guide without a closed-form mean (a transformed Normal): E_q[z_u | x] is a mean of S runs, whose sampling
    variance sigma^2 / S = 0.0225 (sigma = 1.5, S = 100) would count a unit that does not depend on x as active (the
    text evaluation's own copy did that before it used the library's). Unit 0 depends on x, unit 1 does not."""
    from pyrovae.evaluate import active_units, unit_activity

    vocab, data = corpus()
    data = Sentences(data.tokens.repeat(50, 1), data.lengths.repeat(50))  # N = 400: the estimate's s.e. ~ 0.0016
    model = bag_of_words_model(len(vocab))
    affine = dist.transforms.AffineTransform(0.0, 1.0, event_dim=1)

    def guide(tokens, lengths):
        loc = torch.stack([(lengths.float() - 6.0) / 3.0, torch.zeros(tokens.shape[0])], -1)
        with pyro.plate("data", tokens.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(dist.Normal(loc, 1.5).to_event(1), [affine]))

    activity = unit_activity(guide, tuple(data))["z"]
    assert not activity.exact and activity.means.var(0)[1] > 0.015  # the uncorrected variance over x: 0.0225
    assert abs(float(activity.variance[1])) < 5 * float(activity.stderr[1]) + 1e-3
    result = evaluate_text(model, guide, data, num_samples=2, batch_size=100, vocab_size=len(vocab))
    assert result["active_units"] == active_units(guide, tuple(data)) == {"z": 1}


# --- the language model under every objective -----------------------------------------------------


def test_language_model_loss_is_its_log_likelihood_under_every_objective():
    vocab, data = corpus()
    lm, guide = RNNLM(len(vocab), embed_dim=8, hidden_dim=12), NoLatentGuide()
    lm.eval()
    ll = direct_log_likelihood(lm, data.tokens, data.lengths, None).sum()
    for objective in (ELBO(), ELBO(num_particles=3), IWAE(5), IWAE(5, estimator="dreg"), Renyi(0.5, num_particles=3), BetaELBO(4.0), AnnealedELBO(0.5, free_bits=1.0)):
        loss = objective.differentiable_loss(lm, guide, *data)
        torch.testing.assert_close(loss, -ll, rtol=1e-5, atol=1e-4)
        assert objective.metrics["kl"].abs().item() == 0.0
    for objective in (VarianceLoss(3), LogVarianceLoss(3)):  # the variance of a constant log weight
        assert objective.differentiable_loss(lm, guide, *data).item() == 0.0
        torch.testing.assert_close(objective.metrics["elbo"] * 8, ll, rtol=1e-5, atol=1e-4)
    geco = TokenGECO(tolerance=0.0)
    loss = geco.differentiable_loss(lm, guide, *data)  # batch x (KL 0 + lambda 1 x mean NLL per token)
    per_token = -direct_log_likelihood(lm, *data, None) / data.lengths
    torch.testing.assert_close(loss, 8 * per_token.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(geco.metrics["elbo"] * 8, ll, rtol=1e-5, atol=1e-4)


def test_token_geco_counts_unmasked_tokens_only():
    vocab, data = corpus()
    model, guide = small_vae(vocab), small_encoder(vocab)
    lw = ELBO(num_particles=2).log_weights(model, guide, *data)
    assert torch.equal(observed_counts(lw.pairs[0])[0], data.lengths.float())
    with pytest.raises(ValueError, match="tolerance"):
        TokenGECO(tolerance=-1.0)
    assert isinstance(TokenGECO(), GECO)


def test_annealed_elbo_schedules_and_free_bits():
    objective = AnnealedELBO(beta=1.0, schedule="logistic", warmup_steps=1000)
    betas = []
    for _ in range(1001):
        betas.append(objective.current_beta)
        objective.step()
    assert betas[0] == pytest.approx(1 / (1 + math.exp(5))) and betas[500] == pytest.approx(0.5) and betas[1000] == pytest.approx(1 / (1 + math.exp(-5)))
    assert all(a < b for a, b in zip(betas, betas[1:]))
    assert AnnealedELBO(schedule="linear", warmup_steps=10).current_beta == 0.0
    with pytest.raises(ValueError, match="schedule"):
        AnnealedELBO(schedule="sigmoid")
    with pytest.raises(ValueError, match="free_bits"):
        AnnealedELBO(free_bits=-0.5)

    # free bits: the KL term is sum_j max(lambda, batch-mean KL_j); dims under the floor get no gradient
    vocab, data = corpus()
    model, guide = small_vae(vocab), small_encoder(vocab)
    lam = 0.05
    fb = AnnealedELBO(beta=1.0, schedule="constant", free_bits=lam)
    pyro.set_rng_seed(0)
    loss = fb.differentiable_loss(model, guide, *data)
    pyro.set_rng_seed(0)
    lw = ELBO().log_weights(model, guide, *data)
    loc, raw = guide.head(guide.features(*data)).chunk(2, -1)
    q = dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-4)
    kl_dims = torch.distributions.kl_divergence(q, dist.Normal(0.0, 1.0)).mean(0)
    expected = -(lw.log_px.sum() - 8 * kl_dims.clamp_min(lam).sum())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    # every dim under the floor: the encoder's gradient is that of the reconstruction term alone
    floor_all = AnnealedELBO(schedule="constant", free_bits=1e3)
    grads = []
    for loss_fn in (lambda: floor_all.differentiable_loss(model, guide, *data), lambda: -ELBO().log_weights(model, guide, *data).log_px.sum()):
        guide.zero_grad()
        pyro.set_rng_seed(5)
        loss_fn().backward()
        grads.append(guide.head.bias.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(floor_all.metrics["free_bits_kl"], torch.tensor(3e3), rtol=1e-6, atol=1e-3)


# --- outputs --------------------------------------------------------------------------------------


def test_text_outputs_are_written(tmp_path):
    vocab, data = corpus()
    model, guide = small_vae(vocab), small_encoder(vocab)
    out = write_text_outputs(model, guide, data, vocab, tmp_path, num=4, max_length=6)
    for name in ("samples", "reconstructions", "homotopies"):
        assert (tmp_path / f"{name}.txt").read_text().strip()
    assert len(out["samples"]) == 4 and len(out["reconstructions"]) == 4 and len(out["homotopies"]) == 2
    assert all(len(h.splitlines()) == 5 for h in out["homotopies"])
    out = write_text_outputs(RNNLM(len(vocab), 8, 12), NoLatentGuide(), data, vocab, tmp_path / "lm", num=3, max_length=6)
    assert list(out) == ["samples"]


def test_bad_arguments_name_the_fix():
    vocab, data = corpus()
    with pytest.raises(ValueError, match="rnn='rnn'"):
        SentenceVAE(len(vocab), rnn="rnn")
    with pytest.raises(ValueError, match="word_dropout"):
        SentenceVAE(len(vocab), word_dropout=1.5)
    with pytest.raises(ValueError, match="lengths"):
        poutine.trace(small_vae(vocab)).get_trace(data.tokens, data.lengths + 20)
    with pytest.raises(TypeError, match="Sentences"):
        BucketBatches(data.tokens, 4)


# --- Penn Treebank --------------------------------------------------------------------------------


def test_ptb_loads_the_mikolov_split(data_root):
    if not (data_root / "ptb").is_dir():
        pytest.skip("no ptb/ under PYROVAE_DATA")
    splits = load_dataset("ptb", data_dir=data_root)
    assert (splits.train.num_sentences, splits.valid.num_sentences, splits.test.num_sentences) == (42068, 3370, 3761)
    assert len(splits.vocab) == 10002  # 10k words with <unk> and <eos>, plus <pad> and <sos>
    assert splits.test.num_tokens == 82430  # 78669 words + one <eos> per sentence
    cut = load_dataset("ptb", data_dir=data_root, max_length=30, overlong="cut")
    assert int(cut.train.lengths.max()) == 31 and cut.train.num_sentences == 42068 and cut.over_limit["train"] > 0
    assert "cut to 30 words" in cut.describe()
    dropped = load_dataset("ptb", data_dir=data_root, max_length=30, overlong="drop")
    assert dropped.train.num_sentences == 42068 - cut.over_limit["train"]


# --- training on a slice of PTB (slow) ------------------------------------------------------------


def _train(model, guide, objective, data, steps, batch_size=32, lr=3e-3):
    params = list(model.parameters()) + list(guide.parameters())
    optim = torch.optim.Adam(params, lr=lr)
    batches = BucketBatches(data, batch_size)
    done = 0
    while done < steps:
        for b in batches:
            optim.zero_grad()
            (objective.differentiable_loss(model, guide, *b) / b.num_sentences).backward()
            optim.step()
            objective.step()
            done += 1
            if done == steps:
                break
    return model, guide


@pytest.fixture
def ptb_slice(data_root):
    if not (data_root / "ptb").is_dir():
        pytest.skip("no ptb/ under PYROVAE_DATA")
    splits = load_dataset("ptb", data_dir=data_root, max_length=25, overlong="drop")
    g = torch.Generator().manual_seed(0)
    train = splits.train.take(torch.randperm(splits.train.num_sentences, generator=g)[:3000])
    test = splits.test.take(torch.randperm(splits.test.num_sentences, generator=g)[:200])
    return splits.vocab, train, test


SIZES = dict(embed_dim=32, hidden_dim=64)


@pytest.mark.slow
def test_training_on_a_ptb_slice_lowers_the_test_nll(ptb_slice):
    vocab, train, test = ptb_slice
    model, guide = SentenceVAE(len(vocab), z_dim=8, **SIZES), SentenceEncoder(len(vocab), z_dim=8, **SIZES)
    before = evaluate_text(model, guide, test, num_samples=2)
    _train(model, guide, ELBO(), train, 150)
    after = evaluate_text(model, guide, test, num_samples=2)
    # per-sentence NLLs on the same sentences: the paired drop is many standard errors
    diff = before["nll_values"] - after["nll_values"]
    assert diff.mean() > 10 * diff.std() / math.sqrt(len(diff))
    assert after["perplexity"] < 0.5 * before["perplexity"]  # from ~10^4 (uniform over words) to well under
    lm = RNNLM(len(vocab), **SIZES)
    lm_before = evaluate_text(lm, NoLatentGuide(), test, num_samples=1)["nll_values"]
    _train(lm, NoLatentGuide(), ELBO(), train, 150)
    diff = lm_before - evaluate_text(lm, NoLatentGuide(), test, num_samples=1)["nll_values"]
    assert diff.mean() > 10 * diff.std() / math.sqrt(len(diff))


def analytic_kl(guide, data: Sentences) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per sentence in closed form (no Monte-Carlo noise)."""
    with torch.no_grad():
        loc, raw = guide.head(guide.features(*data)).chunk(2, -1)
        q = torch.distributions.Normal(loc, torch.nn.functional.softplus(raw) + 1e-4)
        return torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(-1)


@pytest.mark.slow
def test_kl_annealing_and_word_dropout_raise_the_kl(ptb_slice):
    vocab, train, test = ptb_slice
    kls = {}
    for name, p, objective in (
        ("plain", 0.0, ELBO()),
        ("anneal", 0.0, AnnealedELBO(1.0, "logistic", warmup_steps=400)),  # beta_t from 0.007 to 0.18 over the 150 steps
        ("free bits", 0.0, AnnealedELBO(schedule="constant", free_bits=0.5)),
        ("free bits+dropout", 1.0, AnnealedELBO(schedule="constant", free_bits=0.5)),
    ):
        pyro.set_rng_seed(0)
        model, guide = SentenceVAE(len(vocab), z_dim=8, word_dropout=p, **SIZES), SentenceEncoder(len(vocab), z_dim=8, **SIZES)
        _train(model, guide, objective, train, 150)
        kls[name] = analytic_kl(guide, test)

    def more(a, b):  # paired over the same test sentences: mean difference over 4 standard errors
        d = kls[a] - kls[b]
        return d.mean() > 4 * d.std() / math.sqrt(len(d))

    summary = {k: round(float(v.mean()), 3) for k, v in kls.items()}
    # annealing: beta_t < 1 leaves more information in z than the plain ELBO at the same budget
    assert more("anneal", "plain"), summary
    # word dropout 1.0: the decoder sees no words, only z, so z must carry more of the sentence (Bowman et al. 2016,
    # 3.2). Compared under free bits, where the KL term leaves z alone below the floor and only the reconstruction
    # decides how much z carries (with annealing alone, both collapsed within 0.01 nats of each other at this budget)
    assert more("free bits+dropout", "free bits"), summary


@pytest.mark.slow
def test_cli_trains_evaluates_and_samples_a_sentence_vae(data_root, tmp_path, capsys):
    from pyrovae.cli import main

    if not (data_root / "ptb").is_dir():
        pytest.skip("no ptb/ under PYROVAE_DATA")
    run = tmp_path / "run"
    args = ["train", "--dataset", "ptb", "--data-dir", str(data_root), "--model", "sentence", "--train-limit", "256", "--epochs", "1",
            "--eval-limit", "40", "--eval-samples", "2", "--embed-dim", "32", "--hidden", "32", "--word-dropout", "0.3",
            "--objective", "annealed", "--beta-schedule", "logistic", "--warmup-steps", "4", "--free-bits", "0.1", "--max-length", "40",
            "--batch-size", "32", "--run-dir", str(run), "--no-progress", "--device", "cpu", "--capture", "off"]
    assert main(args) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["num_test"] == 40 and math.isfinite(result["test_nll"]) and result["test_perplexity"] > 1
    for name in ("samples.txt", "reconstructions.txt", "homotopies.txt"):
        assert (run / name).read_text().strip()
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("greedy:") == 3


def test_user_written_sequence_model_trains_and_evaluates():
    """A hand-written Pyro program over (tokens, lengths): a bag-of-words decoder from z, masked per token."""
    from pyrovae.train import Trainer

    vocab, data = corpus()
    data = Sentences(data.tokens.repeat(4, 1), data.lengths.repeat(4))
    model = bag_of_words_model(len(vocab))  # the decoder's weights drawn first, then the encoder's
    encoder = torch.nn.EmbeddingBag(len(vocab), 4)

    def guide(tokens, lengths):
        pyro.module("bow_encoder", encoder)
        with pyro.plate("data", tokens.shape[0]):
            loc, raw = encoder(tokens[:, 1:]).chunk(2, -1)  # padding (index 0) is read: a user's choice here
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))

    before = evaluate_text(model, guide, data, num_samples=4, vocab_size=len(vocab))
    Trainer(model, guide, IWAE(2), lr=3e-2, progress=False, capture="off").fit(BucketBatches(data, 8), epochs=5, batch_size=8)
    after = evaluate_text(model, guide, data, num_samples=4, vocab_size=len(vocab))
    diff = before["nll_values"] - after["nll_values"]
    assert diff.mean() > 4 * diff.std() / math.sqrt(len(diff))
    assert after["perplexity"] < before["perplexity"]


# --- the recurrent layers and the captured step ---------------------------------------------------


@pytest.mark.parametrize("rnn", ["lstm", "gru"])
def test_rnn_is_torch_rnn_written_as_cells(rnn):
    """pyrovae.nn.recurrent.RNN: torch.nn.LSTM / GRU's parameters (names, initial values) and outputs."""
    from pyrovae.nn.recurrent import RNN

    torch.manual_seed(4)
    ref = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[rnn](5, 7, 2, batch_first=True)
    torch.manual_seed(4)
    ours = RNN(rnn, 5, 7, 2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    x, h = torch.randn(3, 6, 5), torch.randn(2, 3, 7)
    state = (h, torch.randn(2, 3, 7)) if rnn == "lstm" else h
    (want, want_state), (got, got_state) = ref(x, state), ours(x, state)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(*((got_state, want_state) if rnn == "lstm" else ((got_state,), (want_state,)))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # zero state by default; one step at a time (generation) gives the same outputs as the whole sequence
    out, state = ours(x)
    steps, s = [], None
    for t in range(6):
        o, s = ours(x[:, t : t + 1], s)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref(x)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch first"):
        ours(x[0])


CAPTURED = [
    pytest.param("lstm", 1, True, 0.3, ELBO, id="lstm-bidirectional-word-dropout-elbo"),
    pytest.param("gru", 2, False, 0.0, lambda: IWAE(3), id="gru-2-layers-iwae"),
    pytest.param("lstm", 2, True, 0.5, lambda: AnnealedELBO(1.0, "logistic", warmup_steps=10, free_bits=0.1), id="lstm-2-layers-annealed-free-bits"),
]


@pytest.mark.parametrize("rnn, layers, bidirectional, word_dropout, objective", CAPTURED)
def test_captured_sentence_vae_step_replays_the_plain_step(rnn, layers, bidirectional, word_dropout, objective):
    """The trainer's captured step trains exactly like the plain Pyro step: same losses, parameters and random
    stream, bit for bit. The text models' softmax runs on the predicted positions only, a count read from the
    data, so the capture refuses to record them and says why; the step stays the plain one."""
    from pyrovae.train import Trainer

    vocab, data = corpus()
    batches = [b for b in buckets(data, 4, pad_multiple=4)]
    assert len({b.tokens.shape for b in batches}) == 2

    def train(capture):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = SentenceVAE(len(vocab), z_dim=3, embed_dim=8, hidden_dim=12, num_layers=layers, rnn=rnn, word_dropout=word_dropout)
        guide = SentenceEncoder(len(vocab), z_dim=3, embed_dim=8, hidden_dim=12, num_layers=layers, rnn=rnn, bidirectional=bidirectional)
        trainer = Trainer(model, guide, objective(), lr=1e-2, progress=False, capture=capture, clip_norm=5.0)
        trainer.setup(*batches[0])
        losses = [trainer.step(*batches[i % 2])[0].clone() for i in range(6)]
        return trainer, losses, torch.get_rng_state()

    plain, plain_losses, plain_rng = train("off")
    fast, fast_losses, fast_rng = train("replay")
    assert fast.gradients.capture.captured == 0 and "depends on tensor values" in fast.capture_report  # the packed softmax
    assert "depends on tensor values" in fast.gradients.capture.refused  # for the program: the second width is not traced
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses))
    for (name, p0), p1 in zip(plain.params.items(), fast.params.values()):
        assert torch.equal(p0, p1), name
    assert torch.equal(plain_rng, fast_rng)


def test_validation_of_sentences_runs_by_length_and_equals_the_padded_pass():
    """``Trainer.validate`` takes ``Sentences`` part by part, sorted by length and cut to each part's width
    (``Sentences.chunks``): the same validation ELBO as the one padded pass over the tuple, which runs the RNN over
    every sentence's padding to the longest."""
    from pyrovae.data.text import Sentences
    from pyrovae.train import Trainer

    vocab, data = corpus()
    padded = Sentences(torch.cat([data.tokens, data.tokens.new_zeros(data.num_sentences, 9)], 1), data.lengths)  # 9 more pad columns
    parts = padded.chunks(3)
    assert sum(p.num_sentences for p in parts) == data.num_sentences and all(p.tokens.shape[1] - 1 <= _width(p) for p in parts)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    trainer = Trainer(RNNLM(len(vocab), embed_dim=8, hidden_dim=12), NoLatentGuide(), ELBO(), progress=False)
    trainer.setup(*data)
    by_length, padded_pass = trainer.validate(padded, batch_size=3), trainer.validate(tuple(padded), batch_size=3)
    assert math.isclose(by_length, padded_pass, rel_tol=1e-5), (by_length, padded_pass)
    history = trainer.fit(data, epochs=1, batch_size=4, valid=padded)
    assert math.isfinite(history[-1]["valid_elbo"])


def _width(part) -> int:
    """The padded width a part needs: its longest sentence, rounded up to the buckets' multiple of 8."""
    return -(-int(part.lengths.max()) // 8) * 8


@pytest.mark.parametrize("latent", [True, False], ids=["vae", "lm"])
def test_captured_step_replays_batches_of_one_width_with_other_lengths(latent):
    """The softmax runs on the predicted positions only (``PackedCategorical``), a count that differs between
    batches of one padded width: a graph recorded on one batch would replay the others with the recorded batch's
    sizes (it did, and failed on the next batch), so the capture refuses such graphs and the step stays plain."""
    from pyrovae.data.text import Sentences
    from pyrovae.train import Trainer

    vocab, data = corpus()
    width = int(data.lengths.max())
    batches = []
    for cut in (0, 1, 3, 2):  # one width, a different number of predicted tokens in each batch
        lengths = (data.lengths - cut).clamp(min=1)
        lengths[0] = width  # the width stays the longest sentence's
        tokens = data.tokens.masked_fill(torch.arange(data.tokens.shape[1]) > lengths[:, None], 0)
        batches.append(Sentences(tokens, lengths))
    assert len({int(b.lengths.sum()) for b in batches}) == 4 and len({b.tokens.shape for b in batches}) == 1

    def train(capture):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = (small_vae(vocab, 0.2), small_encoder(vocab)) if latent else (RNNLM(len(vocab), embed_dim=8, hidden_dim=12), NoLatentGuide())
        trainer = Trainer(model, guide, ELBO(), lr=1e-2, progress=False, capture=capture)
        trainer.setup(*batches[0])
        return trainer, [trainer.step(*batches[i % 4])[0].clone() for i in range(8)]

    plain, plain_losses = train("off")
    fast, fast_losses = train("replay")
    assert fast.gradients.capture.captured == 0 and "depends on tensor values" in fast.capture_report  # the packed softmax
    assert len({float(v) for v in plain_losses[:4]}) == 4
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses))
    assert all(torch.equal(p0, p1) for p0, p1 in zip(plain.params.values(), fast.params.values()))


def test_captured_language_model_step_replays_the_plain_step():
    from pyrovae.train import Trainer

    vocab, data = corpus()

    def train(capture):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        trainer = Trainer(RNNLM(len(vocab), embed_dim=8, hidden_dim=12, word_dropout=0.2), NoLatentGuide(), ELBO(), lr=1e-2, progress=False, capture=capture)
        trainer.setup(*data)
        return trainer, [trainer.step(*data)[0].clone() for _ in range(4)]

    plain, plain_losses = train("off")
    fast, fast_losses = train("replay")
    assert fast.gradients.capture.captured == 0 and "depends on tensor values" in fast.capture_report  # the packed softmax
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses))
    assert all(torch.equal(p0, p1) for p0, p1 in zip(plain.params.values(), fast.params.values()))


# ================================================================================================
# issue 26: text data that cannot make a corpus is named for what it is, before anything is allocated


def _ptb_folder(root, train, other="a b c\nb c d\n"):
    (root / "ptb").mkdir(parents=True, exist_ok=True)
    (root / "ptb" / "ptb.train.txt").write_text(train)
    for split in ("valid", "test"):
        (root / "ptb" / f"ptb.{split}.txt").write_text(other)
    return root


@pytest.mark.parametrize("train,message", [
    ("", r"ptb\.train\.txt holds no sentence \(it is empty or blank\)"),  # was: "pass a larger max_length"
    ("  \n\n \t\n", r"ptb\.train\.txt holds no sentence \(it is empty or blank\)"),
    ("<unk> <unk>\n<unk>\n", r"ptb\.train\.txt holds no word beside <pad> <sos> <eos> <unk>"),  # was: "vocab_size=4 must be an int >= 5"
])
def test_a_corpus_without_words_is_named(train, message, tmp_path):
    from pyrovae.data import DataError
    from pyrovae.data.text import load_ptb

    with pytest.raises(DataError, match=message):
        load_ptb(_ptb_folder(tmp_path, train), download=False)


def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, monkeypatch):
    import pyrovae.data.text as T
    from pyrovae.data import DataError

    def no_padding(*a, **k):
        raise AssertionError("the corpus was padded before its size was checked")

    long_line = " ".join(f"w{i % 50}" for i in range(50_000)) + "\n"
    monkeypatch.setattr(T, "pad_sentences", no_padding)
    with pytest.raises(DataError, match=r"a sentence of 50,000 words; sentences of at most 2,000 words.*max_length=N"):
        T.load_ptb(_ptb_folder(tmp_path / "long", "a b c\n" + long_line), download=False)
    huge_vocab = "\n".join(" ".join(f"w{j}" for j in range(i, i + 1000)) for i in range(0, 201_000, 1000)) + "\n"
    with pytest.raises(DataError, match=r"has 201,004 distinct words; at most 200,000.*vocab_size=N"):
        T.load_ptb(_ptb_folder(tmp_path / "vocab", huge_vocab), download=False)
    monkeypatch.undo()
    cut = T.load_ptb(_ptb_folder(tmp_path / "long", "a b c\n" + long_line), max_length=30, download=False)  # the fix the message names
    assert cut.train.tokens.shape == (2, 32)


def test_packed_categorical_is_the_masked_categorical():
    """``PackedCategorical(full_logits[where], where)``: the density of ``Categorical(full_logits)`` on the True
    positions and 0 elsewhere, with particles leading, after ``expand``, and in samples (0 off the grid)."""
    from pyrovae.nn.likelihoods import PackedCategorical

    torch.manual_seed(0)
    full = torch.randn(3, 4, 6, 11, dtype=torch.double)
    mask = torch.arange(6) < torch.tensor([6, 2, 4, 1])[:, None]
    where = mask.expand(3, 4, 6)
    obs = torch.randint(0, 11, (4, 6))
    expected = dist.Categorical(logits=full).mask(mask).to_event(1).log_prob(obs)
    got = PackedCategorical(full[where], where).mask(mask).to_event(1).log_prob(obs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    one = PackedCategorical(full[0][mask], mask).expand((3, 4, 6))  # a grid of one particle, expanded to three
    torch.testing.assert_close(one.log_prob(obs), dist.Categorical(logits=full[0]).log_prob(obs).masked_fill(~mask, 0).expand(3, 4, 6), rtol=0, atol=1e-12)
    drawn = PackedCategorical(full[where], where).sample()
    assert drawn.shape == (3, 4, 6) and bool((drawn[~where] == 0).all())
    with pytest.raises(ValueError, match="no sample dims"):
        PackedCategorical(full[0][mask], mask).log_prob(torch.zeros(2, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="bool grid"):
        PackedCategorical(full[0][mask], mask.long())


def test_packed_categorical_gradient_is_cross_entropys():
    """Its log-probability's hand-written backward (softmax once, picked entries added) gives ``cross_entropy``'s
    gradient, for any upstream gradient (gradcheck in double), repeated targets included."""
    from pyrovae.nn.likelihoods import PackedCategorical, _PickedLogSoftmax

    torch.manual_seed(0)
    logits = torch.randn(7, 13, dtype=torch.double, requires_grad=True)
    target = torch.tensor([0, 3, 3, 12, 5, 0, 7])
    upstream = torch.randn(7, dtype=torch.double)
    got, = torch.autograd.grad(_PickedLogSoftmax.apply(logits, target), logits, upstream)
    expected, = torch.autograd.grad(-torch.nn.functional.cross_entropy(logits, target, reduction="none"), logits, upstream)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda l: _PickedLogSoftmax.apply(l, target), (logits,))
    full = torch.randn(3, 3, 13, dtype=torch.double, requires_grad=True)
    where = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])
    value = torch.randint(0, 13, (3, 3))
    packed, = torch.autograd.grad(PackedCategorical(full[where], where).log_prob(value).sum(), full)
    masked, = torch.autograd.grad(dist.Categorical(logits=full).log_prob(value).masked_fill(~where, 0).sum(), full)
    torch.testing.assert_close(packed, masked, rtol=0, atol=1e-12)
