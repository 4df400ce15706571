#!/usr/bin/perl -w
# Bench echo server on PublicInbox::DS 1.9 (Debian libpublicinbox-perl):
# the system ds_trio ports, doing what public-inbox's NNTP/IMAP daemons do.
#
# Usage: perl bench/servers/perl_ds_echo.pl PORT   (0: any free port)
#
# Protocol: "bulk N\n" is answered with N bytes, any other line is echoed.
#
# Structure, as in public-inbox 1.9:
# - the listen socket is wrapped in the real PublicInbox::Listener
#   (level-triggered EPOLLIN|EPOLLEXCLUSIVE, one accept() per wake-up);
#   its post_accept callback creates an EchoClient;
# - EchoClient registers with EPOLLIN|EPOLLONESHOT and its event_step is
#   modelled on PublicInbox::NNTP::event_step: flush_write first, then
#   handle ONE line per step (do_read re-arms the one-shot interest on
#   EAGAIN), then requeue itself if nothing is pending, so pipelined lines
#   are served one per loop iteration, fairly with other clients;
# - output goes through DS's write, which spills what the socket does not
#   take to an unlinked temporary file (that is how the real system
#   buffers large responses: it is measured as is);
# - signals go through event_loop($sig, $oldset) as in PublicInbox::Daemon:
#   all signals blocked, TERM/INT delivered by a signalfd in the loop.
use strict;
use v5.10.1;
use IO::Socket::INET;
use PublicInbox::DS;
use PublicInbox::Listener;

package EchoClient;
use strict;
use parent qw(PublicInbox::DS);
use PublicInbox::Syscall qw(EPOLLIN EPOLLONESHOT);

use constant LINE_MAX => 65536; # like NNTP's LINE_MAX: refuse silly lines
my $bulk_buf = ''; # one cached bulk payload: allocating N bytes per request
                   # would measure malloc, not the event loop

sub new {
	my ($class, $sock) = @_;
	my $self = bless {}, $class;
	$self->SUPER::new($sock, EPOLLIN | EPOLLONESHOT);
}

sub process_line ($$) {
	my ($self, $line) = @_;
	if ($line =~ /\Abulk ([0-9]+)\n\z/) {
		my $n = $1 + 0;
		$bulk_buf = "\0" x $n if length($bulk_buf) != $n;
		return $self->write(\$bulk_buf);
	}
	$self->write(\$line);
}

sub event_step {
	my ($self) = @_;
	# only read more requests once the write buffer is drained, otherwise
	# we would buffer without back-pressure (as NNTP.pm does)
	return unless $self->flush_write && $self->{sock};

	my $rbuf = $self->{rbuf} // \(my $x = '');
	my $nl = index($$rbuf, "\n");
	while ($nl < 0) {
		return $self->close if length($$rbuf) >= LINE_MAX;
		$self->do_read($rbuf, LINE_MAX, length($$rbuf)) or return;
		$nl = index($$rbuf, "\n");
	}
	my $line = substr($$rbuf, 0, $nl + 1, '');
	process_line($self, $line);
	return unless $self->{sock}; # write may have closed us
	$self->rbuf_idle($rbuf);

	# maybe there is more pipelined data, or we have to wait for the
	# socket: either way the next step finds out
	$self->requeue unless $self->{wbuf};
}

package main;

my $port = shift // die "usage: $0 PORT\n";
$port =~ /\A[0-9]+\z/ or die "usage: $0 PORT\n";
my $srv = IO::Socket::INET->new(
	LocalAddr => '127.0.0.1',
	LocalPort => $port,
	Proto => 'tcp',
	ReuseAddr => 1,
	Listen => 1024,
	Blocking => 0,
) or die "listen 127.0.0.1:$port: $!\n";

# as PublicInbox::Daemon does before the loop: block every signal so the
# ones we care about arrive through the signalfd (Sigfd) inside event_loop
my $oldset = PublicInbox::DS::block_signals();
PublicInbox::Listener->new($srv, sub {
	my ($client, $addr, $listen_sock) = @_;
	EchoClient->new($client);
});
$| = 1;
print "READY ", $srv->sockport, "\n";
my $quit = sub { exit(0) };
PublicInbox::DS::event_loop({ TERM => $quit, INT => $quit }, $oldset);
