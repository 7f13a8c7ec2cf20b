"""A stand-in for Blinka's `board` (tests only): the I2C pin names."""

SCL = "SCL"
SDA = "SDA"
