"""FastAPI through ``@serve.ingress``: class methods as routes, path/query params, pydantic
bodies and 422s, dependencies, and the app's own /docs and /openapi.json under the prefix."""

# No ``from __future__ import annotations`` here: test_http_fastapi_annotations.py covers it.

from typing import Annotated

import httpx
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel

import serval as serve


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


def get_token(x_token: str = Header(...)) -> str:
    if x_token != "secret":
        raise HTTPException(status_code=403, detail="bad token")
    return x_token


def pagination(skip: int = 0, limit: int = 10) -> dict:
    return {"skip": skip, "limit": limit}


app = FastAPI(title="serval-items")


@serve.deployment
@serve.ingress(app)
class Items:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting
        self.store: dict[int, Item] = {}

    @app.get("/")
    def root(self) -> dict:
        return {"greeting": self.greeting}

    @app.get("/items/{item_id}")
    def get(self, item_id: int, q: str | None = None) -> dict:
        return {"item_id": item_id, "q": q, "greeting": self.greeting}

    @app.post("/items/{item_id}")
    async def put(self, item_id: int, item: Item) -> dict:
        self.store[item_id] = item
        return {"item_id": item_id, "total": item.price * 2, "item": item.model_dump()}

    @app.get("/stored/{item_id}")
    def stored(self, item_id: int) -> Item:
        if item_id not in self.store:
            raise HTTPException(status_code=404, detail="no such item")
        return self.store[item_id]

    @app.get("/secure")
    def secure(self, token: str = Depends(get_token)) -> dict:
        return {"token": token}

    @app.get("/page")
    def page(self, p: Annotated[dict, Depends(pagination)]) -> dict:
        return p

    def helper(self, x: int) -> int:  # not a route: callable by handle
        return x + len(self.greeting)


def test_path_and_query_params(http_url: str) -> None:
    serve.run(Items.bind("hi"), route_prefix="/api")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.get("/api/items/42", params={"q": "search"})
        assert r.status_code == 200
        assert r.json() == {"item_id": 42, "q": "search", "greeting": "hi"}
        r = client.get("/api/items/7")
        assert r.json() == {"item_id": 7, "q": None, "greeting": "hi"}
        r = client.get("/api/")
        assert r.status_code == 200
        assert r.json() == {"greeting": "hi"}
        r = client.get("/api")
        assert r.status_code in (200, 307)
        assert client.get("/api/no/such/route").status_code == 404
        assert client.get("/api/items/42").headers.get("x-request-id")


def test_validation_errors_are_422(http_url: str) -> None:
    serve.run(Items.bind("hi"), route_prefix="/api")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.get("/api/items/not-an-int")
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert detail[0]["loc"] == ["path", "item_id"]
        assert r.headers.get("x-request-id")

        r = client.post("/api/items/1", json={"name": "widget"})  # price missing
        assert r.status_code == 422
        assert any(d["loc"] == ["body", "price"] for d in r.json()["detail"])

        r = client.post("/api/items/1", json={"name": "widget", "price": "not a number"})
        assert r.status_code == 422

        r = client.post(
            "/api/items/1", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 422

        assert client.put("/api/items/1", json={}).status_code == 405


def test_pydantic_body(http_url: str) -> None:
    serve.run(Items.bind("hi"), route_prefix="/api")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.post("/api/items/3", json={"name": "widget", "price": 2.5, "tags": ["a"]})
        assert r.status_code == 200
        assert r.json() == {
            "item_id": 3,
            "total": 5.0,
            "item": {"name": "widget", "price": 2.5, "tags": ["a"]},
        }
        # state kept on the deployment object (one replica)
        r = client.get("/api/stored/3")
        assert r.status_code == 200
        assert r.json() == {"name": "widget", "price": 2.5, "tags": ["a"]}
        r = client.get("/api/stored/99")
        assert r.status_code == 404
        assert r.json() == {"detail": "no such item"}


def test_dependencies(http_url: str) -> None:
    serve.run(Items.bind("hi"), route_prefix="/api")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.get("/api/secure", headers={"x-token": "secret"})
        assert r.status_code == 200
        assert r.json() == {"token": "secret"}
        assert client.get("/api/secure", headers={"x-token": "wrong"}).status_code == 403
        assert client.get("/api/secure").status_code == 422  # the header is required
        assert client.get("/api/page").json() == {"skip": 0, "limit": 10}
        assert client.get("/api/page", params={"skip": 5, "limit": 2}).json() == {
            "skip": 5,
            "limit": 2,
        }


def test_handle_calls_next_to_fastapi_routes(http_url: str) -> None:
    handle = serve.run(Items.bind("hello"), route_prefix="/api")
    assert handle.helper.remote(1).result(timeout_s=10) == 6
    assert httpx.get(f"{http_url}/api/", timeout=10).json() == {"greeting": "hello"}


def test_openapi_and_docs_under_the_prefix(http_url: str) -> None:
    serve.run(Items.bind("hi"), route_prefix="/api")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        r = client.get("/api/openapi.json")
        assert r.status_code == 200
        schema = r.json()
        assert schema["info"]["title"] == "serval-items"
        paths = schema["paths"]
        for route in ("/items/{item_id}", "/secure", "/page", "/stored/{item_id}"):
            assert route in paths, (route, sorted(paths))
        assert set(paths["/items/{item_id}"]) == {"get", "post"}
        # `self` is not a parameter FastAPI shows
        names = {p["name"] for p in paths["/items/{item_id}"]["get"]["parameters"]}
        assert names == {"item_id", "q"}
        assert "Item" in schema["components"]["schemas"]

        r = client.get("/api/docs")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert "/api/openapi.json" in r.text

        # the schema the docs page points at is reachable
        assert client.get("/api/openapi.json").status_code == 200
        # nothing leaks outside the prefix
        assert client.get("/openapi.json").status_code == 404
        assert client.get("/docs").status_code == 404


other_app = FastAPI()


@serve.deployment
@serve.ingress(other_app)
class Plain:
    @other_app.get("/where")
    def where(self) -> str:
        return "plain"


def test_two_fastapi_apps_side_by_side(http_url: str) -> None:
    serve.run(Items.bind("hi"), name="items", route_prefix="/api")
    serve.run(Plain.bind(), name="plain", route_prefix="/plain")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert client.get("/plain/where").json() == "plain"
        assert client.get("/api/items/1").json()["item_id"] == 1
        assert client.get("/plain/openapi.json").json()["paths"].keys() == {"/where"}
        assert "/plain/openapi.json" in client.get("/plain/docs").text
