"""Adapter-affinity router: one HTTP entry point in front of several ftserve replicas (``ftserve router``).

Why affinity
    Every replica serves the same base model, but an adapter is cheap only where it is already loaded: a
    first use reads and registers the weights, a ``cpu`` adapter must be copied to the device, and the
    prefix and response caches of an adapter live on the replica that served it. Spreading one adapter's
    requests round-robin over N replicas pays those costs N times and splits its caches N ways.

What "holds" means
    A replica holds an adapter when the adapter is registered in its engine, which is what the admin API
    ``GET /v1/adapters`` lists, with a residency: ``device`` (in a compute slot) is better than ``cpu``
    (weights in host memory), which is better than ``disk`` (registered, weights dropped). The public
    ``GET /v1/models`` cannot be used: it also lists adapters that would only load on first use. So the
    router reads the admin API with the replicas' admin token (``admin_token_env``, the same secret the
    replicas get). Without a token the router still works: no replica counts as a holder, and hashing
    alone keeps each adapter on the same replica(s). No change to the service was needed.

How a replica is chosen (:mod:`.select`)
    Ready holders first (best residency first), then the other ready replicas; within each group,
    rendezvous (highest-random-weight) hashing of ``(model, replica URL)`` with a stable hash. Rendezvous
    hashing gives each adapter a fixed preference order over the replicas, the same in every router
    process with no shared state, and a replica joining or leaving moves only the adapters whose first
    choice it is. Alone it would let one hot adapter swamp its replica, so the order is bounded by load
    (consistent hashing with bounded loads): a replica carrying more than ``max_load_factor`` times the
    mean in-flight count (+1) goes behind the others, and the hot adapter spills to its next replica
    in hash order, which then starts holding it too. In-flight counts are the router's own; with several
    routers each bounds its own share, which is what the bound is for.

What is proxied (:mod:`.app`, :mod:`.proxy`)
    Generations (``POST /v1/chat/completions`` and ``/v1/completions``) are routed by their ``model``;
    responses, SSE streams included, are relayed chunk by chunk with an ``x-ftserve-replica`` header. A
    replica that cannot be reached (or answers 503, still loading) is skipped for the next; a request
    that reached a replica is never sent twice. Adapter admin writes (``POST /v1/adapters``,
    ``DELETE /v1/adapters/{name}``) fan out to every ready replica and answer with each one's result,
    since every replica must serve every adapter; the client's own ``Authorization`` header is passed
    on. A replica that becomes ready later starts from its deployment file (``bentos/*.yaml``,
    its ``adapters:`` list), so put lasting adapter choices there. Everything else goes to the least busy
    ready replica. The router has its own ``/healthz``, ``/readyz`` (some replica ready), ``/metrics``
    (``ftserve_router_*``) and ``/router/replicas``.

On Kubernetes
    One router Deployment (stateless: more replicas of it are fine, each hashes the same way) behind a
    normal Service, in front of a *headless* Service over the ftserve pods (``bentos/kubernetes/``):
    ``ftserve router --dns-name ftserve-replicas.<namespace>.svc.cluster.local --replica-port 3000``.
    The router re-resolves the name at every refresh, so scaling the ftserve Deployment is seen within
    ``refresh_s``; the headless Service lists ready pods, and the router's own ``/readyz`` polls confirm
    readiness.

gRPC is not proxied
    The router speaks HTTP/1.1 REST only. gRPC clients (``ftserve.v1.Generation``) should either connect
    to a replica directly (the headless Service, client-side ``round_robin`` or pick-first per adapter),
    or go through an L7 gRPC proxy (Envoy ``ring_hash`` / ``maglev`` load balancing, hashing on a request
    header) and send the adapter name as metadata ``x-ftserve-adapter``, which gives the same adapter
    concentration.
"""
