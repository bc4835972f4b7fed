"""Operations on the quant table that several passes share: planning and re-planning, parameters."""
