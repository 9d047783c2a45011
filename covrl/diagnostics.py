"""Entropy diagnostics from the paper, and a feedback controller that holds entropy at a target.

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", make three empirical / analytical claims that these functions check on a run:

* **R–H law.** Under GRPO-style training the reward follows ``R = -a * exp(H) + b``, so the
  ceiling once entropy is exhausted (``H = 0``) is ``-a + b``. :func:`fit_reward_entropy` fits
  it by ordinary least squares: given ``x = exp(H)`` the model is linear in ``(a, b)``, so the
  fit is exact and closed form (no iterative optimiser, no initial guess).
  :func:`forecast_ceiling` fits only the first ``fraction`` of a run's steps, the paper's
  "predict the final performance early" use.
* **Covariance drives entropy.** Lemma 1: for a softmax policy, a change ``dz`` of the logits
  at state ``s`` changes its entropy by ``H_{k+1}(s) - H_k(s) ≈ -Cov_{a~pi}(log pi(a), dz(a))``.
  Theorem 2 (natural policy gradient, tabular softmax, ``dz = eta * A``) turns this into
  ``-eta * Cov_{a~pi}(log pi(a), A(a))``; Theorem 1 (vanilla PG, ``dz = eta * pi * A``) into
  ``-eta * Cov(log pi, pi * A)``. :func:`predicted_entropy_change` applies Theorem 2's form to
  the batch estimate ``covrl.policy_loss`` reports as ``metrics["cov"]`` (Eq. 10's token-wise
  centred product, averaged over all response tokens of the batch: the estimator Clip-Cov
  and KL-Cov select with).

  The approximation, said plainly: (1) it is first order in ``eta``; (2) Theorems 1 / 2 are
  exact only for a tabular softmax; (3) the batch estimate pools tokens of different states,
  so it mixes the within-state covariance the theorem is about with a between-state term;
  (4) with a neural network and Adam there is no single "learning rate" in logit space.
  :func:`fit_step_size` fits an *effective* ``eta`` by least squares through the origin on
  ``(cov_t, dH_t)`` pairs; ``dH_t`` should be the *same-batch* change (the learner's
  ``entropy_delta``: the step's own tokens before and after its update), not the difference
  between two sampled batches, which is mostly resampling noise (issue 15). The learner
  measures the step size it really took instead (``covrl.learner.diagnostics``), and
  predicts by Lemma 1 with no constant at all. Whether a prediction tracks ``dH`` is what
  :func:`pearson` measures (a constant ``eta`` only scales it, it cannot change the
  correlation); :func:`same_batch_metrics` gives the trainer's live ``entropy/*`` metrics.

:class:`EntropyController` goes beyond the paper: it turns one regularisation knob of the
Clip-Cov / KL-Cov loss (``kl_coef``, ``kl_cov_fraction`` or ``clip_cov_fraction``) from the
measured entropy (and optionally the covariance) each step, so entropy settles at a target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "EntropyController",
    "RHFit",
    "entropy_drops",
    "fit_reward_entropy",
    "fit_step_size",
    "forecast_ceiling",
    "pearson",
    "predicted_entropy_change",
    "same_batch_metrics",
    "same_batch_record",
]


def _as_1d(name: str, values, *, min_len: int = 1) -> np.ndarray:
    """A float64 1-D copy of ``values``; errors name ``name`` and say what was expected."""
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} values, got {arr.size}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite; {name}[{i}] = {arr[i]!r}")
    return arr


def _pair(x_name: str, x, y_name: str, y, *, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    xa = _as_1d(x_name, x, min_len=min_len)
    ya = _as_1d(y_name, y, min_len=min_len)
    if xa.size != ya.size:
        raise ValueError(f"{x_name} and {y_name} must have the same length, got {xa.size} and {ya.size}")
    return xa, ya


# --------------------------------------------------------------------------------------
# R = -a * exp(H) + b


@dataclass(frozen=True)
class RHFit:
    """Least-squares fit of ``R = -a * exp(H) + b``.

    ``ceiling`` is the reward predicted at ``H = 0`` (``-a + b``), ``r2`` the coefficient of
    determination on the fitted points (``1 - SS_res / SS_tot``), ``n`` the number of points.
    """

    a: float
    b: float
    r2: float
    n: int
    ceiling: float = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "ceiling", -self.a + self.b)

    def predict(self, entropy):
        """Reward predicted at ``entropy`` (scalar -> float, array -> ndarray)."""
        if np.ndim(entropy) == 0:
            return float(-self.a * math.exp(float(entropy)) + self.b)
        return -self.a * np.exp(np.asarray(entropy, dtype=np.float64)) + self.b

    def to_dict(self) -> dict:
        return asdict(self)


def fit_reward_entropy(entropy, reward) -> RHFit:
    """Fit ``R = -a * exp(H) + b`` by ordinary least squares on ``x = exp(H)``.

    ``a = -cov(x, R) / var(x)``, ``b = mean(R) + a * mean(x)``. Needs at least 3 points and
    entropies that are not all equal (``a`` is undetermined otherwise). ``r2`` is 1.0 when the
    rewards are constant (the horizontal line fits them exactly).
    """
    h, r = _pair("entropy", entropy, "reward", reward, min_len=3)
    if (h > 50).any():
        raise ValueError(f"entropy must be in nats and <= 50 (exp would overflow the fit), got max {h.max()}")
    x = np.exp(h)
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx <= 1e-12 * max(1.0, float(x @ x)):
        raise ValueError("entropy must vary across the points: with one entropy value a and b are undetermined")
    slope = float(xc @ (r - r.mean())) / sxx  # dR/dexp(H) = -a
    a = -slope
    b = float(r.mean()) + a * float(x.mean())
    resid = r - (-a * x + b)
    ss_res = float(resid @ resid)
    rc = r - r.mean()
    ss_tot = float(rc @ rc)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return RHFit(a=a, b=b, r2=r2, n=int(h.size))


def forecast_ceiling(entropy, reward, fraction: float = 0.2) -> RHFit:
    """:func:`fit_reward_entropy` on the first ``fraction`` of the steps (at least 3 points).

    The paper's use: fit early, read off ``ceiling = -a + b`` as the forecast of the reward the
    run converges to once its entropy is spent.
    """
    if not isinstance(fraction, (int, float)) or not (0.0 < float(fraction) <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    h, r = _pair("entropy", entropy, "reward", reward, min_len=3)
    n = max(3, int(math.ceil(fraction * h.size)))
    return fit_reward_entropy(h[:n], r[:n])


# --------------------------------------------------------------------------------------
# Covariance -> entropy change


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length series; NaN when either is constant."""
    xa, ya = _pair("x", x, "y", y, min_len=2)
    xc = xa - xa.mean()
    yc = ya - ya.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if den == 0.0:
        return float("nan")
    return float(np.clip(float(xc @ yc) / den, -1.0, 1.0))


def predicted_entropy_change(cov, step_size: float):
    """The paper's first-order entropy change ``dH ≈ -step_size * cov``.

    ``cov`` is the token-mean centred ``Cov(log pi, A)`` of a batch (``policy_loss`` metric
    ``"cov"``), a scalar or an array of per-step values; ``step_size`` is the effective step
    size, e.g. from :func:`fit_step_size` on an earlier run (see the module docstring for why it
    is not the optimiser's learning rate). Returns a float for a scalar ``cov``.
    """
    if not isinstance(step_size, (int, float)) or not math.isfinite(step_size):
        raise ValueError(f"step_size must be a finite number, got {step_size!r}")
    if np.ndim(cov) == 0:
        c = float(cov)
        if not math.isfinite(c):
            raise ValueError(f"cov must be finite, got {c!r}")
        return -float(step_size) * c
    return -float(step_size) * _as_1d("cov", cov)


def fit_step_size(cov, dH) -> float:
    """Least-squares ``eta`` in ``dH ≈ -eta * cov`` (through the origin): ``-sum(cov*dH)/sum(cov^2)``.

    ``cov[t]`` is the covariance measured at step ``t`` and ``dH[t] = H[t+1] - H[t]`` the
    entropy change that step's update caused. May come out negative when ``-cov`` does not
    track ``dH``; it is returned as is so the caller can see that.
    """
    c, d = _pair("cov", cov, "dH", dH, min_len=1)
    scc = float(c @ c)
    if scc == 0.0:
        raise ValueError("cov must not be all zero: the step size is undetermined")
    return -float(c @ d) / scc


# --------------------------------------------------------------------------------------
# Feedback control of entropy

KNOBS = ("kl_coef", "kl_cov_fraction", "clip_cov_fraction")
# init, lower, upper per knob. All three act the same way: larger = stronger entropy protection
# (a larger KL weight on the selected tokens, or more tokens selected).
_KNOB_DEFAULTS = {
    # kl_coef above ~20-30 destabilised learning in docs/entropy_study.md's runs.
    "kl_coef": (1.0, 1e-1, 20.0),
    "kl_cov_fraction": (2e-3, 2e-4, 5e-2),
    "clip_cov_fraction": (2e-3, 2e-4, 5e-2),
}


class EntropyController:
    """Holds the policy entropy near ``target`` by turning one Clip-Cov / KL-Cov knob.

    Control law (per call of :meth:`update`, in log space because every knob is a positive
    scale spanning orders of magnitude):

    * look-ahead: ``H_pred = H + horizon * predicted_entropy_change(cov, eta)`` when a covariance
      is given and an effective step size ``eta > 0`` is known (``step_size=``, or fitted online
      by :func:`fit_step_size` on this controller's own history of ``(cov_t, H_t+1 - H_t)`` once
      ``min_fit_points`` pairs exist); otherwise ``H_pred = H``. This is the paper's mechanism
      used as a derivative term: a large positive covariance says entropy is about to fall, so
      protect it before it does (entropy responds to the knob with a lag: the knob sets the
      *rate* of entropy change, not its level, and a plain PI loop on such a plant overshoots).
    * ``e = log(H_pred / target)``: positive when entropy is (heading) above target.
    * integral: ``I <- clip(I - gain_i * e, log(lower), log(upper))`` (the clip is the anti-windup).
    * output: ``knob = clip(exp(I - gain_p * e), lower, upper)``.

    So entropy below target -> larger knob (stronger regularisation / more tokens selected),
    above target -> smaller knob. The defaults (``gain_p=2``, ``gain_i=0.2``, ``horizon=10``,
    ``kl_coef`` in [0.1, 20]) are the ones that held entropy in ``covrl experiment entropy``
    (docs/entropy_study.md). ``tolerance`` is the band the caller wants entropy in
    (recorded per step as ``in_band``). :meth:`update` returns the loss keyword arguments for
    the next step (``{"kl_coef": 2.3}``); :attr:`history` keeps one record per call for logging.
    """

    def __init__(
        self,
        target: float,
        tolerance: float = 0.2,
        knob: str = "kl_coef",
        *,
        init: float | None = None,
        lower: float | None = None,
        upper: float | None = None,
        gain_p: float = 2.0,
        gain_i: float = 0.2,
        use_cov: bool = True,
        horizon: float = 10.0,
        step_size: float | None = None,
        min_fit_points: int = 10,
    ):
        if knob not in KNOBS:
            raise ValueError(f"knob must be one of {KNOBS}, got {knob!r}")
        if not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
            raise ValueError(f"target must be a positive entropy in nats, got {target!r}")
        if not isinstance(tolerance, (int, float)) or not (0.0 < tolerance < 1.0):
            raise ValueError(f"tolerance must be a fraction in (0, 1) (0.2 = ±20%), got {tolerance!r}")
        d_init, d_lo, d_hi = _KNOB_DEFAULTS[knob]
        lower = d_lo if lower is None else lower
        upper = d_hi if upper is None else upper
        init = min(max(d_init, lower), upper) if init is None else init
        if not (0 < lower <= upper):
            raise ValueError(f"bounds must satisfy 0 < lower <= upper, got lower={lower!r}, upper={upper!r}")
        if knob != "kl_coef" and upper > 1.0:
            raise ValueError(f"upper must be <= 1 for the fraction knob {knob}, got {upper!r}")
        if not (lower <= init <= upper):
            raise ValueError(f"init must lie in [lower, upper] = [{lower}, {upper}], got {init!r}")
        for name, g in (("gain_p", gain_p), ("gain_i", gain_i), ("horizon", horizon)):
            if not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {g!r}")
        if step_size is not None and (not math.isfinite(step_size) or step_size <= 0):
            raise ValueError(f"step_size must be a positive number or None, got {step_size!r}")
        if min_fit_points < 2:
            raise ValueError(f"min_fit_points must be >= 2, got {min_fit_points!r}")
        self.target = float(target)
        self.tolerance = float(tolerance)
        self.knob = knob
        self.lower = float(lower)
        self.upper = float(upper)
        self.gain_p = float(gain_p)
        self.gain_i = float(gain_i)
        self.use_cov = bool(use_cov)
        self.horizon = float(horizon)
        self.step_size = None if step_size is None else float(step_size)
        self.min_fit_points = int(min_fit_points)
        self._integral = math.log(init)
        self.value = float(init)
        self.history: list[dict[str, float | None]] = []  # None: not measured / not yet known

    # -- helpers -------------------------------------------------------------------

    def kwargs(self) -> dict[str, float]:
        """The loss keyword arguments for the current knob value."""
        return {self.knob: self.value}

    def in_band(self, entropy: float) -> bool:
        return abs(entropy / self.target - 1.0) <= self.tolerance

    def _eta(self, current: tuple[float, float] | None = None) -> float | None:
        if self.step_size is not None:
            return self.step_size
        # The same-batch series (cov_t, dH_t of the step-t batch; ``current`` is this step's pair)
        # when the caller measures it; else the next-batch one (H_t+1 - H_t, dominated by
        # resampling noise, issue 15).
        pairs = [(h["cov"], h["observed_delta"]) for h in self.history
                 if h["cov"] is not None and h.get("observed_delta") is not None]
        pairs += [current] if current is not None else []
        if not pairs:
            pairs = [
                (h0["cov"], h1["entropy"] - h0["entropy"])
                for h0, h1 in zip(self.history[:-1], self.history[1:], strict=True)
                if h0["cov"] is not None
            ]
        if len(pairs) < self.min_fit_points:
            return None
        c, d = zip(*pairs, strict=True)
        try:
            eta = fit_step_size(c, d)
        except ValueError:
            return None
        return eta if eta > 0 else None

    # -- the step ------------------------------------------------------------------

    def update(self, entropy: float, cov: float | None = None,
               observed_delta: float | None = None) -> dict[str, float]:
        """Feed this step's measured entropy (and covariance); returns the next step's loss kwargs.

        ``observed_delta``: this step's same-batch entropy change (the learner's
        ``entropy_delta``, after - before on the step's own tokens). When given, ``eta`` is
        fitted on the ``(cov_t, observed_delta_t)`` pairs, this one included.
        """
        if not isinstance(entropy, (int, float)) or not math.isfinite(entropy) or entropy < 0:
            raise ValueError(f"entropy must be a finite number >= 0 (nats), got {entropy!r}")
        if cov is not None and (not isinstance(cov, (int, float)) or not math.isfinite(cov)):
            raise ValueError(f"cov must be a finite number or None, got {cov!r}")
        if observed_delta is not None and (not isinstance(observed_delta, (int, float))
                                           or not math.isfinite(observed_delta)):
            raise ValueError(f"observed_delta must be a finite number or None, got {observed_delta!r}")
        entropy = float(entropy)
        current = None if cov is None or observed_delta is None else (float(cov), float(observed_delta))
        eta = self._eta(current) if (self.use_cov and cov is not None) else None
        h_next = entropy
        if eta is not None:
            h_next = entropy + self.horizon * predicted_entropy_change(float(cov), eta)
        # Entropy can be driven to (or predicted below) zero: floor it so the log stays finite.
        floor = 1e-3 * self.target
        err = math.log(max(h_next, floor) / self.target)
        lo, hi = math.log(self.lower), math.log(self.upper)
        self._integral = min(max(self._integral - self.gain_i * err, lo), hi)
        self.value = float(min(max(math.exp(self._integral - self.gain_p * err), self.lower), self.upper))
        self.history.append(
            {
                "step": float(len(self.history)),
                "entropy": entropy,
                "cov": None if cov is None else float(cov),
                "observed_delta": None if observed_delta is None else float(observed_delta),
                "step_size": eta,
                "predicted_entropy": h_next,
                "error": err,
                "in_band": float(self.in_band(entropy)),
                self.knob: self.value,
            }
        )
        return self.kwargs()

    # -- checkpointing -------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "target": self.target,
            "tolerance": self.tolerance,
            "knob": self.knob,
            "lower": self.lower,
            "upper": self.upper,
            "gain_p": self.gain_p,
            "gain_i": self.gain_i,
            "use_cov": self.use_cov,
            "horizon": self.horizon,
            "step_size": self.step_size,
            "min_fit_points": self.min_fit_points,
            "integral": self._integral,
            "value": self.value,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"knob", "integral", "value", "history"} - set(state)
        if missing:
            raise KeyError(f"EntropyController state is missing {sorted(missing)}")
        if state["knob"] != self.knob:
            raise ValueError(f"state is for knob {state['knob']!r}, this controller turns {self.knob!r}")
        for key in ("target", "tolerance", "lower", "upper", "gain_p", "gain_i", "use_cov", "horizon",
                    "step_size", "min_fit_points"):
            if key in state:
                setattr(self, key, state[key])
        self._integral = float(state["integral"])
        self.value = float(state["value"])
        self.history = [dict(h) for h in state["history"]]


# --------------------------------------------------------------------------------------
# Same-batch entropy change, live (the trainer's entropy/* metrics)

SAME_BATCH_WINDOW = 20  # trailing steps of the live Pearson
# learner metric -> trainer history key -> trainer metric
SAME_BATCH_KEYS = (
    ("entropy_delta", "dH_same", "entropy/observed_delta"),
    ("entropy_delta_lemma1", "dH_lemma1", "entropy/predicted_delta_lemma1"),
    ("entropy_delta_cov", "dH_cov", "entropy/predicted_delta_cov"),
    ("entropy_step_size", "eta", "entropy/step_size"),
)


def same_batch_record(learner_metrics: dict) -> dict[str, float]:
    """This step's same-batch entries for the trainer's history, from the learner's metrics
    (``covrl.learner.diagnostics``; absent when ``measure_entropy_change`` is off)."""
    return {key: float(learner_metrics[src]) for src, key, _ in SAME_BATCH_KEYS
            if src in learner_metrics and math.isfinite(float(learner_metrics[src]))}


def same_batch_metrics(history: Sequence[dict], window: int = SAME_BATCH_WINDOW) -> dict[str, float]:
    """The latest step's ``entropy/*`` metrics and, over the last ``window`` steps of ``history``
    (records from :func:`same_batch_record`), the Pearson of each prediction against the observed
    same-batch change (``entropy/pearson_lemma1``, ``entropy/pearson_cov``; from 3 pairs, NaN-free)."""
    if window < 3:
        raise ValueError(f"window must be >= 3, got {window!r}")
    out: dict[str, float] = {}
    if not history:
        return out
    for _, key, name in SAME_BATCH_KEYS:
        if key in history[-1]:
            out[name] = history[-1][key]
    tail = list(history)[-window:]
    for key, name in (("dH_lemma1", "entropy/pearson_lemma1"), ("dH_cov", "entropy/pearson_cov")):
        pairs = [(h[key], h["dH_same"]) for h in tail if key in h and "dH_same" in h]
        if len(pairs) >= 3:
            r = pearson([p for p, _ in pairs], [o for _, o in pairs])
            if math.isfinite(r):
                out[name] = r
    return out


def entropy_drops(entropy: Sequence[float]) -> np.ndarray:
    """``-(H[t+1] - H[t])`` for a per-step entropy series (length ``len(entropy) - 1``)."""
    h = _as_1d("entropy", entropy, min_len=2)
    return -(h[1:] - h[:-1])
