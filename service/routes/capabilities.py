"""``GET /v1/capabilities``: the saliency methods, credit strategies, granularities and metrics this
server offers, from the registries (so a plugin's method is listed with the built-ins). The client SDK and
CLI read their lists from here, since they cannot import the core."""

from __future__ import annotations

import typing

from fastapi import APIRouter, Depends

from faithlens.params import Granularity
from faithlens.saliency import SALIENCY_METHODS
from service.auth import require
from service.schemas import Capabilities, CreditStrategyInfo, ErrorResponse, Metric, SaliencyMethodInfo
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
        granularities=list(typing.get_args(Granularity)),
        metrics=list(typing.get_args(Metric)),
    )
