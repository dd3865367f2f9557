"""``GET /v1/capabilities``: the saliency methods, credit strategies, granularities and metrics this
server offers, from the registries (so a plugin's method is listed with the built-ins). The client SDK and
CLI read their lists from here, since they cannot import the core."""

from __future__ import annotations

import typing

from fastapi import APIRouter, Depends

from faithlens.arith import ARITH_FAMILIES
from faithlens.arith import SPLITS as TASK_SPLITS
from faithlens.data import DATASETS
from faithlens.params import Granularity
from faithlens.saliency import SALIENCY_METHODS
from service.auth import require
from service.schemas import (
    Capabilities,
    CreditStrategyInfo,
    DatasetInfo,
    ErrorResponse,
    Metric,
    SaliencyMethodInfo,
)
from training.credit import CREDIT_STRATEGIES

router = APIRouter(
    prefix="/v1",
    tags=["faithlens"],
    responses={401: {"model": ErrorResponse}},
    dependencies=[Depends(require("infer"))],
)


@router.get("/capabilities", response_model=Capabilities)
async def capabilities() -> Capabilities:
    return Capabilities(
        saliency_methods=[
            SaliencyMethodInfo(
                name=m.name, description=m.description, options=list(m.options), cost=m.cost_note
            )
            for m in SALIENCY_METHODS
        ],
        credit_strategies=[
            CreditStrategyInfo(name=c.name, description=c.description) for c in CREDIT_STRATEGIES
        ],
        datasets=_datasets(),
        granularities=list(typing.get_args(Granularity)),
        metrics=list(typing.get_args(Metric)),
    )


def _datasets() -> list[DatasetInfo]:
    fixed = [
        DatasetInfo(name=name, description=f"GSM8K's {split} split", example=name, splits=[])
        for name, split in DATASETS.items()
    ]
    tasks = [
        DatasetInfo(
            name=f"{f.name}:<lo>-<hi>[@<seed>]/<split>",
            description=f"{f.description} Each operand in [lo, hi]; the split is fixed by the name and seed, "
            "and the held-out problems (a quarter, at most 1,000) are never trained on.",
            example=f"{f.example}/train",
            splits=list(TASK_SPLITS),
        )
        for f in ARITH_FAMILIES
    ]
    return fixed + tasks
