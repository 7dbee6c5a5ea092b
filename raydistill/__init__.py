"""raydistill: distributed knowledge distillation on Ray with a cached, refreshed soft-target store."""
