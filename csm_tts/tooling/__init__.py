"""Development and deployment tooling, never imported by the runtime: the local Triton launcher, rendering the model
repository per profile, tiny random checkpoints, a gRPC streaming client and benchmark statistics."""
