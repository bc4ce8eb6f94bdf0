// Written by the emulator helper.
