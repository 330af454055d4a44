"""Layer 2: channel pruning: plan data, graph tracing into coupled groups, scoring, selection, rails, surgery."""
