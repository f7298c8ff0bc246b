"""What a unit is (the parameter slices of an MLP channel or attention head, per architecture) and what is done to a
set of them: classification into ESU / EUU / CU / RU, the portable unit map, exact masks, stability."""
