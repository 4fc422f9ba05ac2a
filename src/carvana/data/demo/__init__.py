"""The demo data: procedurally drawn cars in a studio, in the exact Carvana layout, so every
capability runs (and is tested) without the competition files.

  car_model - the demo cars as 3-D models: random specs, geometry, the turntable camera
  car       - draws one view of a demo car in its studio, with its exact mask
  dataset   - the demo dataset in the exact Carvana layout, made of those cars
  trimap    - the demo cars as a 3-class trimap set (car / background / border) in the folder layout
"""
