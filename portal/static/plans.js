// A plan's first payment that needs the customer (3-D Secure): Stripe.js's own flow.
import {say, stripe, finishPayment} from './portal.js';

const box = document.getElementById('confirm-payment');
const status = document.getElementById('confirm-status');
document.getElementById('confirm-button').addEventListener('click', async () => {
  try {
    await finishPayment(stripe(), box.dataset.clientSecret);
    say(status, 'Confirmed. Your plan\'s credits arrive in a moment.', 'ok');
    window.location.assign('/portal/plans?notice=subscribed');
  } catch (err) {
    say(status, `Not confirmed: ${err.message}.`, 'error');
  }
});
