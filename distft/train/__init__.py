"""The training job: `job` wires the components and runs the loop; `step` is one step; `heads`
the heads of a run (`grid`: a grid as data, `memory`: what they need); `builders` build the
data and the network for a freeze plan; `resilience` handles preemption and hangs."""
