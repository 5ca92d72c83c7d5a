// Package term puts a terminal into raw mode and back, for the serial
// console. It is the one place outside kvm/ that needs termios.
package term

import (
	"golang.org/x/sys/unix"
)

// IsTerminal reports whether fd is a terminal.
func IsTerminal(fd int) bool {
	_, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	return err == nil
}

// State is a terminal's saved mode.
type State struct {
	fd  int
	old unix.Termios
}

// MakeRaw puts the terminal fd in raw mode (no echo, no line editing, no
// signals from keys, output processing kept so that "\n" still returns the
// carriage) and returns the previous state for Restore.
func MakeRaw(fd int) (*State, error) {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, err
	}
	s := &State{fd: fd, old: *t}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
		return nil, err
	}
	return s, nil
}

// Restore puts the terminal back in the state MakeRaw found it in.
func (s *State) Restore() error {
	return unix.IoctlSetTermios(s.fd, unix.TCSETS, &s.old)
}
