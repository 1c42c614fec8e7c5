"""FastAPI routes in a module with ``from __future__ import annotations`` (string annotations),
as many user scripts have: the pydantic body model must still resolve inside the replica."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

import serval as serve


class Order(BaseModel):
    sku: str
    quantity: int


app = FastAPI()


@serve.deployment
@serve.ingress(app)
class Orders:
    @app.post("/orders")
    async def create(self, order: Order) -> dict:
        return {"sku": order.sku, "quantity": order.quantity}

    @app.get("/orders/{order_id}")
    def get(self, order_id: int, verbose: bool = False) -> dict:
        return {"order_id": order_id, "verbose": verbose}


def test_string_annotations_resolve_in_the_replica(http_url: str) -> None:
    serve.run(Orders.bind(), route_prefix="/shop")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.get("/shop/orders/5", params={"verbose": "true"})
        assert r.status_code == 200
        assert r.json() == {"order_id": 5, "verbose": True}

        r = client.post("/shop/orders", json={"sku": "abc", "quantity": 3})
        assert r.status_code == 200, r.text
        assert r.json() == {"sku": "abc", "quantity": 3}

        r = client.post("/shop/orders", json={"sku": "abc"})
        assert r.status_code == 422
        assert any(d["loc"] == ["body", "quantity"] for d in r.json()["detail"])

        r = client.get("/shop/openapi.json")
        assert r.status_code == 200, r.text
        assert "Order" in r.json()["components"]["schemas"]
