import math

import pytest
import torch
import torch.nn.functional as F

from korch.losses import balanced_class_weights, classification_loss


def _probs(row):
    """Softmax of a Python list, by hand."""
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_focal_matches_hand_arithmetic():
    # Two samples, three classes, gamma=2, eps=0.1, alpha=(0.25, 0.5, 1.0): the formula written out term by term.
    logits = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]]
    labels = [0, 2]
    gamma, eps, alpha = 2.0, 0.1, [0.25, 0.5, 1.0]
    expected = 0.0
    for row, label in zip(logits, labels):
        p = _probs(row)
        q = [(1 - eps) * (c == label) + eps / 3 for c in range(3)]
        expected += -sum(q[c] * alpha[c] * (1 - p[c]) ** gamma * math.log(p[c]) for c in range(3))
    expected /= 2

    got = classification_loss(torch.tensor(logits), torch.tensor(labels), loss="focal", gamma=gamma, alpha=alpha,
                              label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal_without_smoothing_is_the_textbook_form():
    # eps=0: only the label's term survives, -(1 - p_y)^gamma log p_y.
    logits, labels = torch.tensor([[1.0, -1.0], [0.2, 0.4], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    expected = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        p_y = _probs(row)[label]
        expected += -((1 - p_y) ** 2) * math.log(p_y)
    got = classification_loss(logits, labels, loss="focal", gamma=2.0)
    assert got.item() == pytest.approx(expected / 3, rel=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.3])
def test_focal_gamma0_is_label_smoothed_cross_entropy(eps):
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    focal = classification_loss(logits, labels, loss="focal", gamma=0.0, label_smoothing=eps)
    ce = F.cross_entropy(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(focal, ce)


def test_focal_alpha_weights_each_class_term():
    torch.manual_seed(1)
    logits, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    # With eps=0 only the label's term is non-zero, so alpha scales each sample by alpha[y].
    per_sample = torch.stack([classification_loss(logits[i:i + 1], labels[i:i + 1], loss="focal", gamma=1.5)
                              for i in range(8)])
    alpha = [0.2, 1.0, 3.0]
    weighted = classification_loss(logits, labels, loss="focal", gamma=1.5, alpha=alpha)
    torch.testing.assert_close(weighted, (per_sample * torch.tensor(alpha)[labels]).mean())
    # alpha of ones is the same as no alpha.
    torch.testing.assert_close(classification_loss(logits, labels, loss="focal", alpha=[1.0, 1.0, 1.0]),
                               classification_loss(logits, labels, loss="focal"))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_class_weights_match_torch_cross_entropy(eps):
    torch.manual_seed(2)
    logits, labels = torch.randn(12, 4), torch.randint(0, 4, (12,))
    weights = [0.5, 2.0, 1.0, 3.0]
    got = classification_loss(logits, labels, label_smoothing=eps, class_weights=weights)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, weight=torch.tensor(weights), label_smoothing=eps))
    # Focal with gamma=0 and no smoothing weights samples the same way torch does.
    focal = classification_loss(logits, labels, loss="focal", gamma=0.0, class_weights=weights)
    torch.testing.assert_close(focal, F.cross_entropy(logits, labels, weight=torch.tensor(weights)))


def test_focal_class_weights_are_a_weighted_mean():
    torch.manual_seed(3)
    logits, labels = torch.randn(6, 2), torch.tensor([0, 0, 0, 0, 1, 1])
    per_sample = torch.stack([classification_loss(logits[i:i + 1], labels[i:i + 1], loss="focal", label_smoothing=0.1)
                              for i in range(6)])
    w = torch.tensor([1.0, 4.0])[labels]
    got = classification_loss(logits, labels, loss="focal", label_smoothing=0.1, class_weights=[1.0, 4.0])
    torch.testing.assert_close(got, (per_sample * w).sum() / w.sum())


@pytest.mark.parametrize("loss", ["cross_entropy", "focal"])
def test_gradients_flow(loss):
    logits = torch.randn(4, 3, requires_grad=True)
    classification_loss(logits, torch.tensor([0, 1, 2, 1]), loss=loss, label_smoothing=0.1,
                        class_weights=[1.0, 2.0, 1.0]).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_gamma0_gradient_is_finite_on_a_certain_prediction():
    # p_y == 1.0 exactly in float32: (1 - p)^0 must not turn the gradient into NaN.
    logits = torch.tensor([[100.0, -100.0]], requires_grad=True)
    classification_loss(logits, torch.tensor([0]), loss="focal", gamma=0.0).backward()
    assert torch.isfinite(logits.grad).all()


def test_bf16_logits():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    labels = torch.tensor([0, 1, 2, 0])
    for loss in ("cross_entropy", "focal"):
        assert torch.isfinite(classification_loss(logits, labels, loss=loss, class_weights=[1.0, 2.0, 3.0]))


def test_bad_inputs_raise():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="alpha has 2 entries but the logits have 3 classes"):
        classification_loss(logits, labels, loss="focal", alpha=[0.5, 0.5])
    with pytest.raises(ValueError, match="class_weights has 4 entries"):
        classification_loss(logits, labels, class_weights=[1.0] * 4)
    with pytest.raises(ValueError, match="labels must be"):
        classification_loss(logits, labels[:3])
    with pytest.raises(ValueError, match="logits must be"):
        classification_loss(logits[0], labels)
    with pytest.raises(ValueError, match="integer class ids"):
        classification_loss(logits, labels.float())
    with pytest.raises(ValueError, match="loss must be one of"):
        classification_loss(logits, labels, loss="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        classification_loss(logits, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match="with loss='cross_entropy' use class_weights"):
        classification_loss(logits, labels, alpha=[1.0, 1.0, 1.0])


def test_balanced_class_weights():
    # 10 samples, counts 6/3/1: n / (C * count) = 10/18, 10/9, 10/3; every class then sums to n / C.
    weights = balanced_class_weights([6, 3, 1])
    assert weights == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert [w * c for w, c in zip(weights, [6, 3, 1])] == pytest.approx([10 / 3] * 3)
    with pytest.raises(ValueError, match="positive count"):
        balanced_class_weights([3, 0])
    with pytest.raises(ValueError, match="empty"):
        balanced_class_weights([])
