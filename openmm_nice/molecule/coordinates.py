"""The molecular coordinate map: an exact bijection from the flow's unconstrained space to a
molecule's Cartesian positions, through normalised internal coordinates and torsion densities."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from openmm_nice.config import TORSION_FLOOR, TORSION_SMOOTHING
from openmm_nice.flows.transforms import Transform
from openmm_nice.molecule.internal_coordinates import InternalCoordinates, check_batch
from openmm_nice.molecule.torsion_densities import (
    SPARSE_BIN_FRAMES,
    check_torsion_forest,
    circular_cdf,
    conditional_cdfs,
    conditional_normal_to_torsion,
    conditional_torsion_to_normal,
    cross_validated_smoothing,
    cut_angle,
    fit_torsion_tree,
    normal_to_torsion,
    torsion_scan,
    torsion_to_normal,
)

__all__ = [
    "MolecularTransform",
    "fit_stiff_normalisation",
    "initial_stiff_network",
    "residual_normalisation",
    "stiff_shift_and_log_scale",
    "torsion_features",
]

FEATURES_PER_TORSION = 4  # cos and sin of the torsion and of twice it
STIFF_SCALE_BOUND = math.log(4.0)  # the torsions may widen or narrow a stiff coordinate 4-fold
STIFF_RIDGE = 50.0  # the stiff normalisation's ridge, in effective frames (fit_stiff_normalisation)
# the learned conditioning's hidden layer (W, w0, C, E), as the map's parameters are named
STIFF_NETWORK = (
    "stiff_hidden_weight",
    "stiff_hidden_bias",
    "stiff_hidden_mean",
    "stiff_hidden_log_scale",
)


class MolecularTransform(Transform):
    r"""The exact bijection from an unconstrained flow space :math:`s \in R^{3N-6}` to Cartesians.

    Each coordinate is first normalised, :math:`y = \mathrm{shift} + \mathrm{scale} \cdot s`,
    then mapped onto the domain of its internal coordinate:

    - bonds :math:`b = e^{y}` (nm), so s is a normalised log bond length;
    - angles :math:`\theta = \pi\,\sigma(y)`, with :math:`\sigma` the logistic sigmoid;
    - torsions :math:`\phi = c + G^{-1}(\Phi(y))`, with :math:`\Phi` the standard normal CDF,
      c the torsion's cut and G the CDF of a fixed density g on the circle cut at c: g is
      piecewise constant on K equal bins, so G is piecewise linear and both directions are
      closed-form, with :math:`d\phi/dy = \mathcal N(y; 0, 1) / g(\phi)`. With K = 1 (g
      uniform) this is :math:`\phi = \mathrm{offset} + \pi\,\mathrm{erf}(y / \sqrt 2)`, the
      cut at :math:`c = \mathrm{offset} - \pi`. Fitted to data (:meth:`from_data`), g is the
      data's smoothed torsion histogram mixed with a uniform floor, so that every torsion's data
      are normal in y whatever their modes (methyl rotors, the backbone's basins), and regions
      the data never visited keep a share of the volume;

    A torsion may have a parent torsion (``torsion_parent``): its density is then conditional
    on the parent's angle a, :math:`g(\phi \mid a) = (1 - \lambda) g_j(\phi) + \lambda
    g_{j+1}(\phi)` with :math:`g_j` piecewise constant on the same K bins, one for each of P
    bins of a, and :math:`\lambda` a's linear position between the centres of bins j and j + 1
    (periodic). The mixture is again piecewise constant on the K bins, so both directions stay
    closed-form (a bisection finds the bin) and the map is continuous in a. The Jacobian of
    (parent, child) is triangular, so the log-determinant keeps its form with
    :math:`g(\phi \mid a)` in place of :math:`g(\phi)`. The parents form a forest (fitted by
    :meth:`from_data` with ``torsion_tree``: a maximum-mutual-information spanning forest, the
    Chow-Liu tree), so that the map's torsion density is a tree-structured joint density: the
    backbone's (phi, psi) basins, for example, get their own psi distribution for each phi;

    The bonds' and angles' normalisation may follow the torsions (``stiff_mean``,
    ``stiff_log_scale``): :math:`y = \mathrm{shift} + m(\phi) + \mathrm{scale}\,
    e^{\ell(\phi)} s`, with :math:`m = f(\phi) A` and :math:`\ell = c \tanh(f(\phi) B / c)`
    for the features :math:`f(\phi) = (\cos k\phi_j, \sin k\phi_j)_{j, k = 1, 2}` of all
    torsions and :math:`c = \log 4` (:data:`STIFF_SCALE_BOUND`); with a hidden layer
    (``stiff_network``, :math:`h = \tanh(f W + w_0)`), :math:`m = f A + h C` and
    :math:`\ell = c \tanh((f B + h E) / c)`, so that they may also follow combinations of
    torsions (phi and psi together); either way the geometry around
    an atom can shift and narrow with the backbone's and side chains' rotamers, which additive
    couplings (volume-preserving) cannot narrow. The torsions depend on their own s only, so
    the Jacobian stays triangular and adds :math:`\sum \ell(\phi)`;

    and :meth:`~openmm_nice.molecule.internal_coordinates.InternalCoordinates.to_cartesian` places
    the atoms in the canonical frame. The log-determinant is the sum of
    :math:`\sum \log \mathrm{scale} + \sum \ell(\phi)`, the domain maps'
    :math:`\sum y_b + \sum [\log\pi + \log\sigma(y_\theta) + \log\sigma(-y_\theta)]
    + \sum [\log \mathcal N(y_\phi; 0, 1) - \log g(\phi)]` and :math:`\log J(q)`, so that with
    the rigid motion integrated out, :math:`\log p_X(x) = \log p_S(s) - \mathrm{ladj}`.

    Arguments:
        zmatrix: Integer array of shape (N, 4) from :func:`~openmm_nice.molecule.zmatrix.build_zmatrix`.
        shift: The normalisation's shift, shape (3N - 6,), in the order of
            :class:`~openmm_nice.molecule.internal_coordinates.InternalCoordinates` (log nm for bonds,
            logit(theta / pi) for angles).
        scale: The normalisation's positive scale, shape (3N - 6,).
        torsion_offset: The torsions' cuts plus pi, shape (N - 3,), in radians.
        torsion_cdf: G at the K + 1 bin edges from the cut, shape (N - 3, K + 1), rising
            strictly from 0 to 1; None for uniform torsions (K = 1).
        torsion_sign: Shape (N - 3,): 0 for a torsion on the whole circle (the map above),
            +1 or -1 for one kept on the half circle of that sign, the handedness of a
            stereocentre (see :func:`~openmm_nice.molecule.zmatrix.handed_torsions`), mapped by
            :math:`\phi = \pm\pi\,\sigma(y)`; None for all 0.
        torsion_parent: Shape (N - 3,): the index of each torsion's parent torsion, -1 for
            none; the parents form a forest over whole-circle torsions. None for all -1.
        conditional_cdf: Shape (C, P, K + 1), for the C torsions with a parent in increasing
            order: G at the K + 1 bin edges of :math:`g_j` for each of the P parent bins (bin
            j centred at :math:`-\pi + (j + 1/2) 2\pi / P`), each row rising strictly from 0
            to 1. None when no torsion has a parent.
        stiff_mean: A of shape (4 (N - 3), 2N - 3): the bonds' and angles' normalised shift
            that follows the torsions' features (see :func:`torsion_features`). None: zeros.
        stiff_log_scale: B of the same shape, the log-scale that follows them. None: zeros.
        learned_stiff: Make A and B trainable parameters (``nn.Parameter``), so that the loss
            that trains the flow also trains how the bonds and angles follow the torsions;
            the map then always applies them, even while they are zero.
        stiff_network: With ``learned_stiff``: the hidden layer's (W, w0, C, E), of shapes
            (4 (N - 3), H), (H,), (H, 2N - 3) and (H, 2N - 3), trainable parameters too.
            None: no hidden layer (m and l are linear in the features).

    Use :meth:`from_data` to set shift, scale and offsets from a structure or a trajectory.
    They are buffers (saved in the state dict, not trained; so are A and B unless
    ``learned_stiff``) and are cast to the input's
    dtype, so the module works in float32 and float64. A row of s with a non-finite entry
    gives a NaN row of x (no error), which an energy treats as :math:`U = +\infty`.

    Example:
        >>> zmatrix = [[0, -1, -1, -1], [1, 0, -1, -1], [2, 1, 0, -1], [3, 2, 1, 0]]
        >>> reference = torch.tensor([[0.0, 0, 0, 0.15, 0, 0, 0.2, 0.14, 0, 0.35, 0.15, 0.05]])
        >>> t = MolecularTransform.from_data(zmatrix, reference)
        >>> s = torch.randn(5, 6)
        >>> x, ladj = t.call_and_ladj(s)
        >>> x.shape, ladj.shape
        (torch.Size([5, 12]), torch.Size([5]))
        >>> torch.allclose(t.inverse(x), s, atol=1e-4)
        True
    """

    def __init__(
        self,
        zmatrix: np.ndarray | Tensor,
        shift: np.ndarray | Tensor,
        scale: np.ndarray | Tensor,
        torsion_offset: np.ndarray | Tensor,
        torsion_cdf: np.ndarray | Tensor | None = None,
        torsion_sign: np.ndarray | Tensor | None = None,
        torsion_parent: np.ndarray | Tensor | None = None,
        conditional_cdf: np.ndarray | Tensor | None = None,
        stiff_mean: np.ndarray | Tensor | None = None,
        stiff_log_scale: np.ndarray | Tensor | None = None,
        learned_stiff: bool = False,
        stiff_network: tuple[np.ndarray | Tensor, ...] | None = None,
    ):
        super().__init__()
        self.learned_stiff = bool(learned_stiff)
        self.internal = InternalCoordinates(zmatrix)
        dim, n_torsions = self.internal.dim, self.internal.n_atoms - 3
        for name, value, size in (
            ("shift", shift, dim),
            ("scale", scale, dim),
            ("torsion_offset", torsion_offset, n_torsions),
        ):
            value = torch.as_tensor(value, dtype=torch.float64)
            if value.shape != (size,):
                raise ValueError(f"{name} must have shape ({size},), got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite, got {value}")
            self.register_buffer(name, value)
        if not (self.scale > 0).all():
            raise ValueError(f"scale must be positive, got {self.scale}")
        if torsion_cdf is None:
            torsion_cdf = torch.tensor([0.0, 1.0]).expand(n_torsions, 2)
        cdf = torch.as_tensor(torsion_cdf, dtype=torch.float64).clone()
        if cdf.ndim != 2 or cdf.shape[0] != n_torsions or cdf.shape[1] < 2:
            raise ValueError(
                f"torsion_cdf must have shape ({n_torsions}, K + 1) with K >= 1, "
                f"got {tuple(cdf.shape)}"
            )
        if not (
            torch.isfinite(cdf).all()
            and (cdf[:, 0] == 0).all()
            and (cdf[:, -1] == 1).all()
            and (cdf.diff(dim=1) > 0).all()
        ):
            raise ValueError(
                "torsion_cdf must rise strictly from 0 to 1 along each row (every bin needs "
                "positive mass; from_data mixes in a uniform floor for this)"
            )
        self.register_buffer("torsion_cdf", cdf)
        sign = torch.zeros(n_torsions) if torsion_sign is None else torsion_sign
        sign = torch.as_tensor(sign, dtype=torch.float64).clone()
        if sign.shape != (n_torsions,) or not torch.isin(sign, sign.new_tensor([-1, 0, 1])).all():
            raise ValueError(
                f"torsion_sign must hold {n_torsions} values in {{-1, 0, 1}} (0: the whole "
                f"circle; +-1: that half circle, see handed_torsions), got {torsion_sign}"
            )
        self.register_buffer("torsion_sign", sign)
        parent = torch.full((n_torsions,), -1) if torsion_parent is None else torsion_parent
        parent = torch.as_tensor(parent).clone()
        if parent.shape != (n_torsions,) or parent.is_floating_point():
            raise ValueError(
                f"torsion_parent must hold {n_torsions} integer indices (-1: no parent), "
                f"got {torsion_parent}"
            )
        parent = parent.long()
        check_torsion_forest(parent.tolist(), sign.tolist())
        self.register_buffer("torsion_parent", parent)
        n_children = int((parent >= 0).sum())
        if conditional_cdf is None:
            if n_children:
                raise ValueError(f"{n_children} torsions have a parent but conditional_cdf is None")
            conditional_cdf = torch.linspace(0, 1, cdf.shape[1]).expand(0, 1, -1)
        conditional = torch.as_tensor(conditional_cdf, dtype=torch.float64).clone()
        if (
            conditional.ndim != 3
            or conditional.shape[0] != n_children
            or conditional.shape[1] < 1
            or conditional.shape[2] != cdf.shape[1]
        ):
            raise ValueError(
                f"conditional_cdf must have shape ({n_children}, P, {cdf.shape[1]}) (one row "
                f"of the torsion_cdf's K + 1 edges for each child and parent bin), got "
                f"{tuple(conditional.shape)}"
            )
        if n_children and not (
            torch.isfinite(conditional).all()
            and (conditional[..., 0] == 0).all()
            and (conditional[..., -1] == 1).all()
            and (conditional.diff(dim=2) > 0).all()
        ):
            raise ValueError("conditional_cdf must rise strictly from 0 to 1 along each row")
        self.register_buffer("conditional_cdf", conditional)
        self._plan_torsion_tree()
        shape = (FEATURES_PER_TORSION * n_torsions, 2 * self.internal.n_atoms - 3)
        for name, value in (("stiff_mean", stiff_mean), ("stiff_log_scale", stiff_log_scale)):
            value = torch.zeros(shape) if value is None else value
            # row-major whatever the source's layout (a solve's result is column-major), so
            # that a map and its state loaded elsewhere multiply in the same order, bit for bit
            value = torch.as_tensor(value, dtype=torch.float64).clone(
                memory_format=torch.contiguous_format
            )
            if value.shape != shape or not torch.isfinite(value).all():
                raise ValueError(
                    f"{name} must hold finite numbers of shape {shape} (the torsions' "
                    f"{FEATURES_PER_TORSION} features by the bonds and angles), got "
                    f"{tuple(value.shape)}"
                )
            if self.learned_stiff:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        self._stiff_network_names: tuple[str, ...] = ()
        if stiff_network is not None:
            if not self.learned_stiff:
                raise ValueError("stiff_network is trained with the flow: it needs learned_stiff")
            network = _check_stiff_network(stiff_network, *shape)
            for name, value in zip(STIFF_NETWORK, network):
                self.register_parameter(name, nn.Parameter(value))
            self._stiff_network_names = STIFF_NETWORK
        self._plan_stiff_normalisation()

    def _plan_stiff_normalisation(self) -> None:
        """Whether the stiff coordinates follow the torsions, decided once (a Python flag: the
        maps' hot path asks no device for it): always where A and B are learned."""
        self._stiff = self.learned_stiff or bool(
            self.stiff_mean.any() or self.stiff_log_scale.any()
        )

    def stiff_coefficients(self) -> tuple[Tensor, ...]:
        """The learned conditioning's coefficients, detached: (A, B), or (A, B, W, w0, C, E)
        with a hidden layer; what :meth:`from_data` keeps across a refit
        (``stiff_coefficients``)."""
        if not self.learned_stiff:
            raise ValueError("this map's stiff conditioning is not learned: it has no coefficients")
        names = ("stiff_mean", "stiff_log_scale", *self._stiff_network_names)
        return tuple(getattr(self, name).detach() for name in names)

    def _stiff_network(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name).to(dtype) for name in self._stiff_network_names)

    def _plan_torsion_tree(self) -> None:
        """The children of each depth of the torsion forest, with their parents and their rows
        of ``conditional_cdf``, as Python lists (the forward map sets them level by level)."""
        parent = self.torsion_parent.tolist()
        row = {t: i for i, t in enumerate(t for t, p in enumerate(parent) if p >= 0)}
        depth = []
        for t in range(len(parent)):
            d, p = 0, parent[t]
            while p >= 0:
                d, p = d + 1, parent[p]
            depth.append(d)
        self._tree_levels = [
            ([t for t in row if depth[t] == d], [row[t] for t in row if depth[t] == d])
            for d in range(1, max(depth, default=0) + 1)
        ]
        self._children = list(row)

    @property
    def dim(self) -> int:
        """The dimension 3N - 6 of the flow space."""
        return self.internal.dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict brings its own torsion densities, whatever their number of bins.
        cdf = state_dict.get(prefix + "torsion_cdf")
        if cdf is not None and cdf.shape != self.torsion_cdf.shape:
            self.torsion_cdf = self.torsion_cdf.new_empty(cdf.shape)
        if cdf is not None and prefix + "torsion_sign" not in state_dict:
            # saved before handed torsions existed: every torsion covers the whole circle
            state_dict[prefix + "torsion_sign"] = torch.zeros_like(self.torsion_sign)
        if cdf is not None and prefix + "torsion_parent" not in state_dict:
            # saved before conditional torsions existed: every torsion has its own density
            state_dict[prefix + "torsion_parent"] = torch.full_like(self.torsion_parent, -1)
            state_dict[prefix + "conditional_cdf"] = torch.linspace(
                0, 1, cdf.shape[1], dtype=torch.float64
            ).expand(0, 1, -1)
        if cdf is not None:
            # saved before the stiff coordinates followed the torsions: they do not
            for name in ("stiff_mean", "stiff_log_scale"):
                state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        conditional = state_dict.get(prefix + "conditional_cdf")
        if conditional is not None and conditional.shape != self.conditional_cdf.shape:
            self.conditional_cdf = self.conditional_cdf.new_empty(conditional.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._plan_stiff_normalisation()
        parent = state_dict.get(prefix + "torsion_parent")
        if parent is not None:
            check_torsion_forest(parent.tolist(), self.torsion_sign.tolist())
            self._plan_torsion_tree()

    @classmethod
    def from_data(
        cls,
        zmatrix: np.ndarray | Tensor,
        x_frames: np.ndarray | Tensor,
        min_scale: float = 1e-3,
        reference_scale: tuple[float, float, float] = (0.05, 0.15, 1.0),
        bins: int = 360,
        smoothing: float = 5.0,
        floor: float = TORSION_FLOOR,
        density_smoothing: float | str = TORSION_SMOOTHING,
        energy: Callable[[Tensor], Tensor] | None = None,
        symmetry: np.ndarray | Tensor | None = None,
        scan_frames: int = 32,
        scan_angles: int = 72,
        weights: np.ndarray | Tensor | None = None,
        handedness: np.ndarray | Tensor | None = None,
        torsion_tree: bool = False,
        tree_smoothing: Literal["fixed", "adaptive"] = "fixed",
        cuts: np.ndarray | Tensor | None = None,
        stiff_conditioning: bool | Literal["learned"] = False,
        scan_beta: float | None = None,
        stiff_coefficients: tuple[Tensor, ...] | None = None,
        stiff_hidden: int = 0,
    ) -> MolecularTransform:
        r"""A transform normalised to a trajectory, or to one reference structure.

        With F >= 2 frames, each torsion's density g is its circular histogram (``bins`` bins,
        smoothed by a circular Gaussian of ``density_smoothing`` bins) mixed with a uniform
        density of weight ``floor``, and its cut lies in the least-populated region of the
        histogram smoothed by ``smoothing`` bins, so that no data mode is split. Where that
        region is wide (a basin the data never visited may lie in it), an ``energy`` chooses
        the cut inside it: each torsion is set to ``scan_angles`` values in ``scan_frames``
        evenly spaced frames, and the cut goes where
        :math:`-\log \langle e^{-U} \rangle_\mathrm{frames}` is highest, a barrier rather
        than an unvisited basin. Shift and scale are then the mean and standard deviation
        (at least ``min_scale``) of each coordinate in its transformed space: log b,
        logit(theta / pi) and the torsion's :math:`y = \Phi^{-1}(G(\phi - c))`. The cut and g
        only decide how well the flow can fit; every choice is an exact bijection.

        With one frame, torsions are uniform (K = 1) with the cut opposite the reference
        torsion, shift is the reference's value (y = 0 for torsions) and scale is
        ``reference_scale`` = (bond, angle, torsion) for every coordinate of that kind. The
        defaults 0.05 (a 5% bond spread) and 0.15 (about 6 degrees near 110 degrees) are
        somewhat wider than thermal fluctuations at 300 K; 1.0 makes a standard normal s a
        uniform torsion. With one frame, an ``energy`` and ``scan_beta``, each whole-circle
        torsion's density is instead the Boltzmann density at inverse temperature
        ``scan_beta`` (relative to the energy's) of the energy scanned along it at ``bins``
        angles with every other coordinate at the reference, smoothed and floored as above,
        cut at the scan's highest point, with shift 0 and scale 1: a data-free start in which a
        ring's or a planar group's torsions stay near their closed, planar values and a
        rotor's spread over its wells, where uniform torsions break rings (about 1e6 kT in
        the median on phenylalanine dipeptide).

        Arguments:
            zmatrix: Integer array of shape (N, 4) from :func:`~openmm_nice.molecule.zmatrix.build_zmatrix`.
            x_frames: Positions in nm of shape (F, 3N) or (F, N, 3), numpy or torch.
            min_scale: Floor on the data's scale, so that a stiff coordinate stays invertible.
            reference_scale: Scales (bond, angle, torsion) used for a single frame.
            bins: Number K of bins of the torsion densities and histograms.
            smoothing: Width in bins of the Gaussian that smooths the histograms.
            floor: Weight in (0, 1] of the uniform part of each torsion density.
            density_smoothing: Width in bins of the Gaussian that smooths the histograms
                of the torsion densities (a rough density would show up as noise in the
                importance weights, a too smooth one spreads narrow wells), or ``"auto"``:
                each torsion's own width, chosen from :data:`SMOOTHING_CANDIDATES` by
                cross-validation over contiguous blocks of frames (blocks, not single frames,
                because MD frames are correlated: a width must predict a stretch of
                trajectory it has not seen). Fast rotors then get narrow widths and torsions
                whose data cover their basins unevenly get wide ones.
            energy: Optional reduced energy of Cartesian positions (B, 3N) in nm, used to
                place cuts inside wide unvisited regions.
            symmetry: Optional rotational symmetry order of each torsion, shape (N - 3,),
                from :func:`~openmm_nice.molecule.zmatrix.torsion_symmetries`; an n-fold torsion's
                histogram counts each frame at its n equivalent angles, so that a rotor's
                wells get equal shares even where short MD visited them unequally.
            scan_frames: Number of frames the energy scan uses.
            scan_angles: Number of torsion values the energy scan tries.
            weights: Optional non-negative weights of the frames, shape (F,), e.g. the
                normalised importance weights of a generator's own samples, so that the
                densities, cuts, shifts and scales are those of the weighted ensemble
                (data-free training refits the map this way). Frames of weight 0 are unused.
            handedness: Optional ``torsion_sign`` of shape (N - 3,) from
                :func:`~openmm_nice.molecule.zmatrix.handed_torsions`: torsions with sign +-1 keep that
                half circle, normalised like angles (no density, no cut); every frame must
                lie in it.
            torsion_tree: Condition torsion densities on parent torsions (see the class
                docstring): the parents are a Chow-Liu forest of the (weighted) frames over
                the whole-circle torsions without a rotor symmetry, and each child's density
                in each of :data:`PARENT_BINS` parent bins is its weighted, smoothed histogram
                there, leaning to its marginal where the bin holds few frames. Needs F >= 2.
            tree_smoothing: With ``torsion_tree``: ``"fixed"``, every parent bin's density of
                its child smoothed by the child's own width; ``"adaptive"``, a parent bin with
                fewer effective frames than :data:`SPARSE_BIN_FRAMES` smoothed wider, by the
                kernel bandwidth's n^(-1/5) (see :func:`conditional_cdfs`).
            cuts: Optional current cut of each torsion (radians, shape (N - 3,), e.g. a map's
                ``torsion_offset - pi``), for a refit: a cut is kept wherever the smoothed
                histogram is as low there as at its least-populated bin, so that a refit
                moves a cut only when the frames have reached it. Otherwise the choice
                between two empty regions would follow the noise at their edges, and a cut
                that jumps to the other one reorders the torsion's basins along the flow's
                coordinate, which the flow, trained on the old order, does not survive.
            scan_beta: With one frame and an ``energy``: scan each torsion for its initial
                density at this inverse temperature (see above); None: uniform torsions.
            stiff_conditioning: Let the bonds' and angles' normalisation follow the torsions
                (see the class docstring): True: A and B fitted by
                :func:`fit_stiff_normalisation` with :data:`STIFF_RIDGE` (needs F >= 2; with
                one frame the map has none); ``"learned"``: A and B are trainable parameters
                (``learned_stiff``), ``stiff_coefficients`` or zeros, and the bonds' and
                angles' shift and scale are fitted to what is left of them once A and B have
                been taken out (see :func:`residual_normalisation`).
            stiff_coefficients: With ``stiff_conditioning="learned"``: the (A, B) to keep, or
                (A, B, W, w0, C, E) with a hidden layer, e.g. the trained map's own for a refit
                (:meth:`stiff_coefficients`). None: zeros (and a hidden layer from
                :func:`initial_stiff_network`), the unconditional map.
            stiff_hidden: With ``stiff_conditioning="learned"``: the width H of a hidden tanh
                layer between the torsions' features and the learned shift and log-scale (see
                the class docstring); 0: none, m and l linear in the features.

        Returns:
            A :class:`MolecularTransform` with float64 buffers.
        """
        internal = InternalCoordinates(zmatrix)
        n = internal.n_atoms
        if tree_smoothing not in ("fixed", "adaptive"):
            raise ValueError(
                f"tree_smoothing must be 'fixed' or 'adaptive', got {tree_smoothing!r}"
            )
        if stiff_conditioning not in (False, True, "learned"):
            raise ValueError(
                f"stiff_conditioning must be False, True (fitted) or 'learned', "
                f"got {stiff_conditioning!r}"
            )
        learned = stiff_conditioning == "learned"
        if stiff_coefficients is not None and not learned:
            raise ValueError(
                "stiff_coefficients are kept only with stiff_conditioning='learned'; "
                f"got stiff_conditioning={stiff_conditioning!r}"
            )
        if not isinstance(stiff_hidden, int) or stiff_hidden < 0:
            raise ValueError(f"stiff_hidden must be a width >= 0, got {stiff_hidden!r}")
        if stiff_hidden and not learned:
            raise ValueError(
                "stiff_hidden is a layer of the learned conditioning; it needs "
                f"stiff_conditioning='learned', got stiff_conditioning={stiff_conditioning!r}"
            )
        shape = (FEATURES_PER_TORSION * (n - 3), 2 * n - 3)
        coefficients = (torch.zeros(shape, dtype=torch.float64),) * 2
        network = ()
        if stiff_hidden and stiff_coefficients is None:
            network = initial_stiff_network(*shape, stiff_hidden)
        if stiff_coefficients is not None:
            coefficients = tuple(
                torch.as_tensor(c).detach().to("cpu", torch.float64) for c in stiff_coefficients
            )
            expected = 6 if stiff_hidden else 2
            if len(coefficients) != expected or any(
                c.shape != shape or not torch.isfinite(c).all() for c in coefficients[:2]
            ):
                raise ValueError(
                    f"stiff_coefficients must be {expected} finite arrays, (A, B) of shape "
                    f"{shape}"
                    + (" and the hidden layer's (W, w0, C, E)" if stiff_hidden else "")
                    + f" (stiff_hidden={stiff_hidden}), got shapes "
                    f"{[tuple(c.shape) for c in coefficients]}"
                )
            coefficients, network = coefficients[:2], coefficients[2:]
            if network:
                network = _check_stiff_network(network, *shape)
                if network[0].shape[1] != stiff_hidden:
                    raise ValueError(
                        f"stiff_coefficients hold a hidden layer of width "
                        f"{network[0].shape[1]}, not stiff_hidden={stiff_hidden}"
                    )
        x = torch.as_tensor(x_frames).detach().to("cpu", torch.float64)
        if x.ndim == 3:
            x = x.reshape(x.shape[0], -1)
        if x.ndim != 2 or x.shape[1] != 3 * n or x.shape[0] < 1:
            raise ValueError(
                f"x_frames must have shape (F, {3 * n}) or (F, {n}, 3) with F >= 1 for this "
                f"{n}-atom Z-matrix, got {tuple(x_frames.shape)}"
            )
        w = None
        if weights is not None:
            w = torch.as_tensor(weights).detach().to("cpu", torch.float64).reshape(-1)
            if w.shape != (x.shape[0],) or not torch.isfinite(w).all() or (w < 0).any():
                raise ValueError(
                    f"weights must be {x.shape[0]} finite non-negative numbers (one per frame), "
                    f"got shape {tuple(w.shape)}"
                )
            if not w.sum() > 0:
                raise ValueError("weights are all zero: no frame to fit the map to")
            keep = w > 0
            x, w = x[keep], w[keep] / w[keep].sum()
        if not torch.isfinite(x).all():
            raise ValueError("x_frames contains non-finite coordinates; remove those frames")
        with torch.no_grad():
            q = internal.to_internal(x)[0]
        bonds, angles, torsions = q.split([n - 1, n - 2, n - 3], dim=1)
        sign = torch.zeros(n - 3, dtype=torch.float64)
        if handedness is not None:
            sign = torch.as_tensor(np.asarray(handedness), dtype=torch.float64).reshape(-1)
            if sign.shape != (n - 3,):
                raise ValueError(
                    f"handedness must hold {n - 3} signs (one per torsion), got {tuple(sign.shape)}"
                )
        half = sign != 0
        signed = sign * torsions
        if (half & ((signed <= 0) | (signed >= math.pi))).any():
            raise ValueError(
                "some frames have a stereocentre of the other handedness than `handedness` "
                "says (a mirror image); fit the map to frames of the reference stereoisomer"
            )
        y_half = _logit_angle(signed.clamp(1e-12, math.pi - 1e-12))
        if x.shape[0] == 1 and w is None:
            offset = torsions[0]
            y_torsion = torch.where(half, y_half, 0.0)[0]
            shift = torch.cat([bonds[0].log(), _logit_angle(angles[0]), y_torsion])
            kinds = [(n - 1, 0), (n - 2, 1), (n - 3, 2)]
            scale = torch.cat(
                [
                    torch.full((size,), float(reference_scale[i]), dtype=torch.float64)
                    for size, i in kinds
                ]
            )
            scale[2 * n - 3 :] = torch.where(half, reference_scale[1], scale[2 * n - 3 :])
            densities = (offset, None)
            if energy is not None and scan_beta is not None:
                densities = _scanned_densities(
                    internal, q, energy, scan_beta, half, bins, smoothing, floor, density_smoothing
                )
            a = b = None
            if learned:
                a, b = coefficients
                # the reference keeps its place and its spread under the learned coefficients
                mean, log_scale = stiff_shift_and_log_scale(
                    torsion_features(torsions), a, b, network
                )
                shift[: 2 * n - 3] -= mean[0]
                scale[: 2 * n - 3] *= torch.exp(-log_scale[0])
            return cls(
                zmatrix,
                shift,
                scale,
                *densities,
                torsion_sign=sign,
                stiff_mean=a,
                stiff_log_scale=b,
                learned_stiff=learned,
                stiff_network=network or None,
            )
        if not 0 < floor <= 1:
            raise ValueError(f"floor must lie in (0, 1], got {floor}")
        scan = None
        if energy is not None:
            scan = torsion_scan(internal, q, energy, scan_frames, scan_angles)
        frame_weights = None if w is None else w.numpy()
        offsets, cdfs = [], []
        orders = np.ones(n - 3, dtype=np.int64) if symmetry is None else np.asarray(symmetry)
        if orders.shape != (n - 3,) or (orders < 1).any():
            raise ValueError(
                f"symmetry must hold {n - 3} orders >= 1 (one per torsion), got {orders}"
            )
        if density_smoothing != "auto" and (
            isinstance(density_smoothing, str) or not density_smoothing > 0
        ):
            raise ValueError(
                f"density_smoothing must be a positive width in bins or 'auto', "
                f"got {density_smoothing!r}"
            )
        if cuts is not None:
            cuts = torch.as_tensor(cuts).detach().to("cpu", torch.float64).reshape(-1).numpy()
            if cuts.shape != (n - 3,) or not np.isfinite(cuts).all():
                raise ValueError(
                    f"cuts must hold {n - 3} finite angles (one per torsion), got {cuts}"
                )
        widths = []
        for t, values in enumerate(torsions.T.numpy()):
            # each frame's n equivalent angles of an n-fold rotor: shape (n, F)
            copies = values[None] + 2 * math.pi * np.arange(orders[t])[:, None] / orders[t]
            values = copies.reshape(-1)
            copy_weights = None
            if frame_weights is not None:
                copy_weights = np.tile(frame_weights, orders[t])
            cut = cut_angle(
                values,
                bins,
                smoothing,
                None if scan is None else scan[t],
                copy_weights,
                None if cuts is None else float(cuts[t]),
            )
            width = density_smoothing
            if width == "auto":
                width = cross_validated_smoothing(copies - cut, bins, floor, frame_weights)
            widths.append(float(width))
            offsets.append(math.remainder(cut + math.pi, 2 * math.pi))
            cdfs.append(circular_cdf(values - cut, bins, width, floor, copy_weights))
        offset = torch.where(half, 0.0, torch.tensor(offsets, dtype=torch.float64))
        cdf = torch.as_tensor(np.stack(cdfs))
        cdf[half] = torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # unused there
        parent, conditional = None, None
        if torsion_tree:
            sparse_frames = SPARSE_BIN_FRAMES if tree_smoothing == "adaptive" else None
            uniform = np.full(len(x), 1.0 / len(x)) if frame_weights is None else frame_weights
            values = torsions.numpy()
            parent = fit_torsion_tree(values, uniform, (orders == 1) & ~half.numpy())
            children = np.flatnonzero(parent >= 0)
            cut = np.asarray(offsets) - math.pi
            conditional = [
                conditional_cdfs(
                    values[:, t] - cut[t],
                    values[:, parent[t]],
                    bins,
                    widths[t],
                    floor,
                    uniform,
                    sparse_frames,
                )
                for t in children
            ]
            conditional = np.stack(conditional) if len(children) else None
        unit = torch.ones(3 * n - 6, dtype=torch.float64)
        y_torsion = cls(zmatrix, 0 * unit, unit, offset, cdf, sign, parent, conditional)
        y_torsion = y_torsion._torsions_to_normal(torsions)[0]
        y = torch.cat([bonds.log(), _logit_angle(angles), y_torsion], dim=1)
        if w is None:
            mean, std = y.mean(0), y.std(0)
        else:
            mean = w @ y
            std = (w @ (y - mean) ** 2).sqrt()
        stiff_mean = stiff_log_scale = None
        frame_w = torch.full((len(y),), 1.0 / len(y), dtype=y.dtype) if w is None else w
        stiff = 2 * n - 3
        if learned:
            stiff_mean, stiff_log_scale = coefficients
            mean[:stiff], std[:stiff] = residual_normalisation(
                y[:, :stiff],
                torsion_features(torsions),
                stiff_mean,
                stiff_log_scale,
                frame_w,
                network,
            )
        elif stiff_conditioning:
            mean[:stiff], std[:stiff], stiff_mean, stiff_log_scale = fit_stiff_normalisation(
                y[:, :stiff], torsions, frame_w, STIFF_RIDGE
            )
        transform = cls(
            zmatrix,
            mean,
            std.clamp_min(min_scale),
            offset,
            cdf,
            sign,
            parent,
            conditional,
            stiff_mean,
            stiff_log_scale,
            learned_stiff=learned,
            stiff_network=network or None,
        )
        transform.density_smoothing = widths  # what each torsion's density used, in bins
        return transform

    def call_and_ladj(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian positions (B, 3N) in nm from flow coordinates s (B, 3N - 6), and the ladj."""
        check_batch(s, self.dim, "s")
        shift, scale = (b.to(s.dtype) for b in (self.shift, self.scale))
        y = shift + scale * s
        n = self.internal.n_atoms
        torsion, log_slope = self._torsions_from_normal(y[:, 2 * n - 3 :])
        mean, log_scale = self._stiff_normalisation(torsion)
        stiff = (
            shift[: 2 * n - 3]
            + mean
            + scale[: 2 * n - 3] * torch.exp(log_scale) * s[:, : 2 * n - 3]
        )
        y = torch.cat([stiff, y[:, 2 * n - 3 :]], dim=1)
        y_bond, y_angle = stiff.split([n - 1, n - 2], dim=1)
        q = torch.cat([torch.exp(y_bond), math.pi * torch.sigmoid(y_angle), torsion], dim=1)
        x, log_jacobian = self.internal.to_cartesian(q)
        # An infinite angle or torsion saturates to a finite q; mark the row so that the
        # energy sees a non-finite configuration (U = +inf) instead of a degenerate one.
        x = torch.where(torch.isfinite(s).all(dim=1, keepdim=True), x, math.nan)
        ladj = self._ladj_of_maps(y, scale, log_slope) + log_scale.sum(1)
        return x, ladj + log_jacobian

    def inverse_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        r"""Flow coordinates s (B, 3N - 6) of positions x (B, 3N) in nm, and the inverse's ladj.

        A configuration outside the map's domain (a stereocentre of the other handedness than
        ``torsion_sign`` keeps) gets a finite s and ladj :math:`-\infty`: density 0.
        """
        check_batch(x, 3 * self.internal.n_atoms, "x")
        shift, scale = (b.to(x.dtype) for b in (self.shift, self.scale))
        q, minus_log_jacobian = self.internal.to_internal(x)
        n = self.internal.n_atoms
        bonds, angles, torsions = q.split([n - 1, n - 2, n - 3], dim=1)
        y_torsion, log_slope, inside = self._torsions_to_normal(torsions)
        y = torch.cat([torch.log(bonds), _logit_angle(angles), y_torsion], dim=1)
        mean, log_scale = self._stiff_normalisation(torsions)
        stiff = 2 * n - 3
        s = torch.cat(
            [
                (y[:, :stiff] - shift[:stiff] - mean) / (scale[:stiff] * torch.exp(log_scale)),
                (y[:, stiff:] - shift[stiff:]) / scale[stiff:],
            ],
            dim=1,
        )
        ladj = minus_log_jacobian - self._ladj_of_maps(y, scale, log_slope) - log_scale.sum(1)
        return s, torch.where(inside, ladj, -math.inf)

    def _stiff_normalisation(self, torsion: Tensor) -> tuple[Tensor, Tensor]:
        """The bonds' and angles' shift m and log-scale l that follow the torsions (B, T),
        in the normalised space y; zeros where the map has no such coefficients."""
        if not self._stiff:
            zeros = torsion.new_zeros(torsion.shape[0], self.stiff_mean.shape[1])
            return zeros, zeros
        return stiff_shift_and_log_scale(
            torsion_features(torsion),
            self.stiff_mean.to(torsion.dtype),
            self.stiff_log_scale.to(torsion.dtype),
            self._stiff_network(torsion.dtype),
        )

    def _torsions_from_normal(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Torsions (B, T) from their normalised values y, and log|d torsion / d y|."""
        torsion, log_g = normal_to_torsion(y, self.torsion_offset, self.torsion_cdf)
        for children, rows in self._tree_levels:  # parents before their children
            index = torch.tensor(children, device=y.device)
            parents = self.torsion_parent[index]
            new, new_log_g = conditional_normal_to_torsion(
                y[:, index],
                self.torsion_offset[index],
                self.conditional_cdf[torch.tensor(rows, device=y.device)],
                torsion[:, parents],
            )
            torsion = torsion.index_copy(1, index, new)
            log_g = log_g.index_copy(1, index, new_log_g)
        log_slope = -0.5 * math.log(2 * math.pi) - 0.5 * y**2 - log_g
        if not self.torsion_sign.any():
            return torsion, log_slope
        sign = self.torsion_sign.to(y.dtype)
        half = sign != 0
        return (
            torch.where(half, sign * math.pi * torch.sigmoid(y), torsion),
            torch.where(half, _log_slope_of_logistic(y), log_slope),
        )

    def _torsions_to_normal(self, torsion: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The inverse of :meth:`_torsions_from_normal`: y (B, T), log|d torsion / d y| and
        whether every torsion of a row lies in its map's domain (B,)."""
        y, log_g = torsion_to_normal(
            torsion, self.torsion_offset, self.torsion_cdf, with_log_density=True
        )
        if self._children:
            index = torch.tensor(self._children, device=torsion.device)
            new, new_log_g = conditional_torsion_to_normal(
                torsion[:, index],
                self.torsion_offset[index],
                self.conditional_cdf,
                torsion[:, self.torsion_parent[index]],
            )
            y, log_g = y.index_copy(1, index, new), log_g.index_copy(1, index, new_log_g)
        log_slope = -0.5 * math.log(2 * math.pi) - 0.5 * y**2 - log_g
        if not self.torsion_sign.any():
            return y, log_slope, torch.ones_like(y[:, 0], dtype=torch.bool)
        sign = self.torsion_sign.to(torsion.dtype)
        half = sign != 0
        signed = sign * torsion
        inside = ~half | ((signed > 0) & (signed < math.pi))
        # outside the half circle: a finite stand-in (the point's density is set to 0)
        signed = torch.where(inside, signed, math.pi / 2)
        y_half = _logit_angle(signed)
        return (
            torch.where(half, y_half, y),
            torch.where(half, _log_slope_of_logistic(y_half), log_slope),
            inside.all(dim=1),
        )

    def _ladj_of_maps(self, y: Tensor, scale: Tensor, log_slope: Tensor) -> Tensor:
        """log|det| of s -> q: normalisation plus the elementwise domain maps, at y, with
        ``log_slope`` the torsion maps' log-derivatives."""
        n = self.internal.n_atoms
        y_bond, y_angle, _ = y.split([n - 1, n - 2, n - 3], dim=1)
        angle = _log_slope_of_logistic(y_angle)
        return scale.log().sum() + y_bond.sum(1) + angle.sum(1) + log_slope.sum(1)


def _scanned_densities(
    internal: InternalCoordinates,
    q: Tensor,
    energy: Callable[[Tensor], Tensor],
    beta: float,
    half: Tensor,
    bins: int,
    smoothing: float,
    floor: float,
    density_smoothing: float | str,
) -> tuple[Tensor, Tensor]:
    """The offsets (T,) and CDFs (T, bins + 1) of torsion densities from energy scans of one
    structure q (1, 3N - 6) at inverse temperature ``beta`` (see :meth:`MolecularTransform.from_data`)."""
    if not beta > 0:
        raise ValueError(f"scan_beta must be positive, got {beta}")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must lie in (0, 1], got {floor}")
    width = TORSION_SMOOTHING if density_smoothing == "auto" else float(density_smoothing)
    scan = torsion_scan(internal, q, energy, 1, bins)  # at -pi + 2 pi k / bins
    angles = -math.pi + 2 * math.pi * np.arange(bins) / bins
    offsets, cdfs = [], []
    for t in range(internal.n_atoms - 3):
        free = beta * scan[t]
        finite = np.isfinite(free)
        if half[t] or not finite.any():  # a handed torsion has no density; a failed scan none
            offsets.append(0.0 if half[t] else float(q[0, 2 * internal.n_atoms - 3 + t]))
            cdfs.append(np.linspace(0, 1, bins + 1))
            continue
        weights = np.where(finite, np.exp(-(free - free[finite].min())), 0.0)
        cut = cut_angle(angles, bins, smoothing, np.where(finite, scan[t], np.inf), weights)
        offsets.append(math.remainder(cut + math.pi, 2 * math.pi))
        cdfs.append(circular_cdf(angles - cut, bins, width, floor, weights))
    return torch.tensor(offsets, dtype=torch.float64), torch.as_tensor(np.stack(cdfs))


def torsion_features(torsion: Tensor) -> Tensor:
    """The features (B, 4T) of torsions (B, T) that the stiff coordinates' normalisation follows:
    cos and sin of each torsion and of twice it, in that order for each torsion."""
    harmonics = torch.cat([torsion, 2 * torsion], dim=1)
    features = torch.stack([torch.cos(harmonics), torch.sin(harmonics)], dim=2)
    t = torsion.shape[1]
    return features.reshape(-1, 2, t, 2).permute(0, 2, 1, 3).reshape(-1, FEATURES_PER_TORSION * t)


def stiff_shift_and_log_scale(
    features: Tensor, a: Tensor, b: Tensor, network: tuple[Tensor, ...] = ()
) -> tuple[Tensor, Tensor]:
    """The stiff coordinates' torsion-following shift m = f A and log-scale
    l = c tanh(f B / c) (c = :data:`STIFF_SCALE_BOUND`) at torsion features f (B, 4T); with a
    hidden layer ``network`` = (W, w0, C, E) and h = tanh(f W + w0), m = f A + h C and
    l = c tanh((f B + h E) / c)."""
    mean, log_scale = features @ a, features @ b
    if network:
        w, w0, c, e = network
        hidden = torch.tanh(features @ w + w0)
        mean, log_scale = mean + hidden @ c, log_scale + hidden @ e
    return mean, STIFF_SCALE_BOUND * torch.tanh(log_scale / STIFF_SCALE_BOUND)


def initial_stiff_network(n_features: int, n_stiff: int, hidden: int) -> tuple[Tensor, ...]:
    """A hidden layer (W, w0, C, E) of width ``hidden`` that starts as no hidden layer: W
    random with unit-variance pre-activations for unit features (from a fixed seed, so that a
    map's start does not depend on the global random state), w0 = 0, and C = E = 0."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(n_features, hidden, generator=generator, dtype=torch.float64)
    w /= math.sqrt(n_features / 2)  # each feature's variance is 1/2 over the circle
    zeros = torch.zeros(hidden, n_stiff, dtype=torch.float64)
    return w, torch.zeros(hidden, dtype=torch.float64), zeros, zeros.clone()


def _check_stiff_network(network, n_features: int, n_stiff: int) -> tuple[Tensor, ...]:
    values = tuple(
        torch.as_tensor(v)
        .detach()
        .to("cpu", torch.float64)
        .clone(memory_format=torch.contiguous_format)
        for v in network
    )
    hidden = values[0].shape[-1] if values and values[0].ndim == 2 else -1
    shapes = [(n_features, hidden), (hidden,), (hidden, n_stiff), (hidden, n_stiff)]
    if (
        len(values) != 4
        or hidden < 1
        or [tuple(v.shape) for v in values] != shapes
        or not all(torch.isfinite(v).all() for v in values)
    ):
        raise ValueError(
            f"stiff_network must be four finite arrays (W, w0, C, E) of shapes (F, H), (H,), "
            f"(H, M), (H, M) with F = {n_features} torsion features and M = {n_stiff} bonds "
            f"and angles, got shapes {[tuple(v.shape) for v in values]}"
        )
    return values


def fit_stiff_normalisation(
    y: Tensor, torsion: Tensor, weights: Tensor, ridge: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""The normalisation of stiff coordinates y (F, M) that follows the torsions (F, T), fitted
    to weighted frames (weights summing to 1): A by weighted ridge regression of y on the
    torsions' features, B by that of the log squared residual (plus 1.27, the mean log of a
    :math:`\chi^2_1` variable, halved: a log standard deviation); then shift and scale are the
    weighted mean and standard deviation of what remains. The ridge is ``ridge`` divided by
    the frames' effective number (Kish), in units of the features' variance, so that few
    effective frames give a map close to the unconditional one. Returns (shift, scale, A, B)."""
    features = torsion_features(torsion)
    centre = weights @ features
    centred = features - centre
    effective = 1.0 / weights.square().sum()
    gram = centred.T @ (weights[:, None] * centred)
    penalty = (ridge / effective) * torch.eye(gram.shape[0], dtype=gram.dtype)
    solve = lambda target: torch.linalg.solve(
        gram + penalty, centred.T @ (weights[:, None] * target)
    )
    mean_y = weights @ y
    a = solve(y - mean_y)
    residual = y - mean_y - centred @ a
    log_sd = 0.5 * (torch.log(residual.square() + 1e-12 * residual.square().max(0).values) + 1.27)
    b = solve(log_sd - weights @ log_sd)
    return (*residual_normalisation(y, features, a, b, weights), a, b)


def residual_normalisation(
    y: Tensor,
    features: Tensor,
    a: Tensor,
    b: Tensor,
    weights: Tensor,
    network: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor]:
    r"""The shift and scale (M,) of stiff coordinates y (F, M) under the torsion-following
    shift :math:`m = f A` and log-scale :math:`\ell = c \tanh(f B / c)` (features f (F, 4T)):
    those that leave :math:`s = (y - \mathrm{shift} - m) / (\mathrm{scale}\, e^{\ell})` with
    weighted mean 0 and variance 1 (weights summing to 1). A refit of a map whose A and B are
    learned fits these to the residual, so that the shift does not count m's mean twice
    (``network``: a hidden layer, see :func:`stiff_shift_and_log_scale`)."""
    mean, log_scale = stiff_shift_and_log_scale(features, a, b, network)
    rest = y - mean
    inverse_scale = torch.exp(-log_scale)
    shift = (weights @ (rest * inverse_scale)) / (weights @ inverse_scale)
    scale = (weights @ ((rest - shift) * inverse_scale).square()).sqrt()
    return shift, scale


def _log_slope_of_logistic(y: Tensor) -> Tensor:
    """log d(pi sigma(y))/dy, the log-derivative of the maps onto (0, pi)."""
    return math.log(math.pi) + nn.functional.logsigmoid(y) + nn.functional.logsigmoid(-y)


def _logit_angle(angle: Tensor) -> Tensor:
    """logit(theta / pi), written so that angles near pi keep their precision."""
    return torch.log(angle) - torch.log(math.pi - angle)
