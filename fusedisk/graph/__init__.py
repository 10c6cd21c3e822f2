"""The block graph: nodes, edges, the graph of a spec, and the exported disks."""
