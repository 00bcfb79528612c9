"""Self-distillation losses, one module each (DINO CLS, iBOT patch, DEX distillation, balance)."""
