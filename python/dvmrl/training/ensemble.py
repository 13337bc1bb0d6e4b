"""Ensembles of composition MPNNs: members trained with different seeds.

The members share the model config and the test part of the split, and
differ in the training seed (initialisation, batch order, dropout) and,
optionally, in the division of the pool into training and validation
parts. The ensemble predicts the mean of the member predictions. Its
uncertainty is the spread between members, plus the mean predicted
variance when the members have a heteroscedastic head.

An ensemble checkpoint is a member checkpoint (member 0, with its config,
metadata and provenance, but without resume state) plus the entry
``member_states``: the ``state_dict`` of every further member. So it loads
with ``torch.load(..., weights_only=True)`` like any other checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvmrl.model import CompositionMPNN, ModelConfig
from dvmrl.training import checkpoint as ckpt

MEMBER_STATES_KEY = ckpt.MEMBER_STATES_KEY


class EnsembleModel(nn.Module):
    """Mean of several ``CompositionMPNN`` members with one config.

    It has the prediction interface of a single model (``forward``,
    ``forward_with_variance``, ``config``, ``flat`` for the dtype and
    device), so code that predicts with a model accepts an ensemble.

    Args:
        members: the models, at least one, with equal configs, dtypes and
            element descriptors.

    Raises:
        ValueError: for no members, or members that differ in config, dtype
            or descriptors.
    """

    def __init__(self, members: Sequence[CompositionMPNN]) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for position, member in enumerate(members[1:], start=1):
            if member.config != first.config:
                raise ValueError(
                    f"ensemble member {position} has config {member.config}, but "
                    f"member 0 has {first.config}; members must share one config"
                )
            if member.flat.dtype != first.flat.dtype:
                raise ValueError(
                    f"ensemble member {position} has dtype {member.flat.dtype}, but "
                    f"member 0 has {first.flat.dtype}"
                )
            if not torch.equal(member.descriptors.cpu(), first.descriptors.cpu()):
                raise ValueError(
                    f"ensemble member {position} uses other element descriptors "
                    "than member 0"
                )
        self.members = nn.ModuleList(members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def config(self) -> ModelConfig:
        """Config shared by the members."""
        return self.members[0].config

    @property
    def flat(self) -> torch.Tensor:
        """Flat buffer of member 0; its dtype and device are the ensemble's."""
        return self.members[0].flat

    @property
    def descriptors(self) -> torch.Tensor:
        """Element descriptors shared by the members [E, F0]."""
        return self.members[0].descriptors

    @property
    def has_uncertainty(self) -> bool:
        """Whether ``forward_with_variance`` gives a variance.

        True for two or more members (their spread), or for heteroscedastic
        members.
        """
        return len(self.members) > 1 or self.config.heteroscedastic

    @property
    def use_fused(self) -> bool:
        """Whether the members run the fused kernels."""
        return self.members[0].use_fused

    @use_fused.setter
    def use_fused(self, value: bool) -> None:
        for member in self.members:
            member.use_fused = bool(value)

    def member_predictions(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Return every member's prediction in eV/atom [M, B]."""
        return torch.stack(
            [member(element_index, frac, mask) for member in self.members]
        )

    def forward(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Predict the mean of the members in eV/atom [B]."""
        return self.member_predictions(element_index, frac, mask).mean(dim=0)

    def forward_with_variance(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the mean [B] in eV/atom and the variance [B] in (eV/atom)^2.

        The variance is that of the member means (population form, so one
        member gives 0) plus, for heteroscedastic members, the mean of their
        predicted variances.

        Raises:
            RuntimeError: for a single member without an uncertainty.
        """
        if not self.has_uncertainty:
            raise RuntimeError(
                "a one-member ensemble without a heteroscedastic head has no "
                "uncertainty; train more members or use ModelConfig("
                "heteroscedastic=True)"
            )
        if self.config.heteroscedastic:
            pairs = [
                member.forward_with_variance(element_index, frac, mask)
                for member in self.members
            ]
            means = torch.stack([mean for mean, _ in pairs])
            noise = torch.stack([variance for _, variance in pairs]).mean(dim=0)
        else:
            means = self.member_predictions(element_index, frac, mask)
            noise = torch.zeros_like(means[0])
        spread = means.var(dim=0, unbiased=False)
        return means.mean(dim=0), spread + noise


def combine_checkpoints(
    member_paths: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    same_division: bool = True,
) -> Path:
    """Write an ensemble checkpoint from member checkpoints (atomically).

    Args:
        member_paths: checkpoints written by ``Trainer.save`` for the
            members, in member order; they must share the model config and,
            with ``same_division``, the data fingerprint and the target
            scaling.
        path: the ensemble checkpoint to write.
        metadata (dict, optional): replaces member 0's metadata.
        same_division (bool): whether the members trained on one
            train/validation division. Members with their own divisions
            differ in the data fingerprint and the target scaling, which each
            member's state carries (``target_mean``, ``target_std``).

    Returns:
        Path: the file written.

    Raises:
        CheckpointError: when a member cannot be read, does not match
            member 0, is itself an ensemble or is listed twice, or when
            ``path`` is one of the members.
        ValueError: when ``metadata`` uses a key reserved for the checkpoint.
    """
    if not member_paths:
        raise ckpt.CheckpointError("an ensemble checkpoint needs member checkpoints")
    resolved = [Path(member).resolve() for member in member_paths]
    for position, member in enumerate(resolved):
        if member in resolved[:position]:
            # A repeated member adds no information and shrinks the spread.
            raise ckpt.CheckpointError(
                f"member checkpoint {member_paths[position]} is listed twice; pass "
                "each member once"
            )
    if Path(path).resolve() in resolved:
        raise ckpt.CheckpointError(
            f"the ensemble checkpoint {path} is also a member checkpoint, which "
            "writing it would replace; write the ensemble to another file"
        )
    documents = [ckpt.read_checkpoint(member) for member in member_paths]
    for member, document in zip(member_paths, documents, strict=True):
        extra = document.get(MEMBER_STATES_KEY)
        if extra:
            raise ckpt.CheckpointError(
                f"{member} is an ensemble checkpoint of {len(extra) + 1} members, "
                "and only its first member would be kept; pass the checkpoints "
                "of its members instead (dvmrl train writes them to "
                "memberK/model.pt beside the ensemble)"
            )
    first = documents[0]
    shared_keys = ("model_config", "data_fingerprint", "target_scaling")
    if not same_division:
        shared_keys = ("model_config",)
    for member, document in zip(member_paths[1:], documents[1:], strict=True):
        for key in shared_keys:
            if document.get(key) == first.get(key):
                continue
            if key == "model_config":
                fix = "ensemble members must share the model config"
            else:
                # Members of dvmrl train --members N train on their own
                # divisions, so they differ here while sharing data and split.
                fix = (
                    "pass same_division=False when the members trained on their "
                    "own train/validation divisions of one data set and split"
                )
            raise ckpt.CheckpointError(
                f"member checkpoint {member} has another {key} than "
                f"{member_paths[0]}; {fix}"
            )
    payload = {
        key: value
        for key, value in first.items()
        if key not in ("format_version", "resume")
    }
    domains = [document.get("training_domain") for document in documents]
    if all(_is_domain(domain) for domain in domains):
        payload["training_domain"] = _domain_union(domains)
    if metadata is not None:
        ckpt.check_metadata_keys(metadata)
        payload["metadata"] = dict(metadata)
    payload[MEMBER_STATES_KEY] = [
        dict(document["model_state"]) for document in documents[1:]
    ]
    return ckpt.write_checkpoint(path, payload)


def _is_domain(domain: Any) -> bool:
    return isinstance(domain, dict) and all(
        key in domain for key in ("elements", "max_elements", "min_fraction")
    )


def _domain_union(domains: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the training domain of an ensemble: the union of its members'.

    Members trained on their own divisions see other compositions, so an
    element or a fraction that one member saw is inside the ensemble's
    domain. ``n_train`` becomes the largest member's training count.
    """
    from dvmrl.elements import ELEMENTS

    order = {symbol: position for position, symbol in enumerate(ELEMENTS)}
    seen = set().union(*(domain["elements"] for domain in domains))
    union = dict(domains[0])
    union["elements"] = sorted(seen, key=lambda symbol: order.get(symbol, len(order)))
    union["max_elements"] = max(int(domain["max_elements"]) for domain in domains)
    union["min_fraction"] = min(float(domain["min_fraction"]) for domain in domains)
    counts = [domain["n_train"] for domain in domains if "n_train" in domain]
    if counts:
        union["n_train"] = max(int(count) for count in counts)
    return union
