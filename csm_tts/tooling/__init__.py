"""Development and deployment tooling, never imported by the runtime: the local Triton launcher, rendering the model
repository per profile, tiny random checkpoints, a gRPC streaming client, benchmark statistics and the proxy's
event-loop lag probe (loop_lag.py)."""
