"""hexgen.coordinator: the HexGen-2 planner (cost model, partition, max-flow, refinement, simulator)."""
